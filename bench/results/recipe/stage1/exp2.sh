set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
B=runs/local-vfill
a=exp_s1_240; mkdir -p runs/$a; [ -e runs/$a/distill_set ] || ln -s /work/main/$B/distill_set runs/$a/distill_set
$DA pretrain cluster/jobs/local.yaml --resume --set name=$a --set pretrain.max_steps=240 --set pretrain.checkpoint_every=240 --set pretrain.warmup_steps=12
$DA distill cluster/jobs/local.yaml --resume --set name=$a --set learner.checkpoint_every=50

set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
B=runs/local-vfill
a=exp_s1_240_lr1; mkdir -p runs/$a; [ -e runs/$a/distill_set ] || ln -s /work/main/$B/distill_set runs/$a/distill_set
[ -e runs/$a/draft_pretrained ] || { cp -r runs/exp_s1_240/draft_pretrained runs/$a/; cp runs/exp_s1_240/pretrain_done.json runs/exp_s1_240/draft_vocab.json runs/$a/ ; }
$DA distill cluster/jobs/local.yaml --resume --set name=$a --set learner.checkpoint_every=50 --set learner.lr=1e-3
a=exp_s1_400; mkdir -p runs/$a; [ -e runs/$a/distill_set ] || ln -s /work/main/$B/distill_set runs/$a/distill_set
$DA pretrain cluster/jobs/local.yaml --resume --set name=$a --set pretrain.max_steps=400 --set pretrain.checkpoint_every=400 --set pretrain.warmup_steps=16
$DA distill cluster/jobs/local.yaml --resume --set name=$a --set learner.checkpoint_every=40 --set learner.lr=1e-3 --set learner.max_steps=120

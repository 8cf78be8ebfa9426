set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
B=runs/local-vfill
a=exp_s1_240_s3_120; mkdir -p runs/$a; [ -e runs/$a/distill_set ] || ln -s /work/main/$B/distill_set runs/$a/distill_set
[ -e runs/$a/draft_pretrained ] || { cp -r runs/exp_s1_240/draft_pretrained runs/$a/; cp runs/exp_s1_240/pretrain_done.json runs/exp_s1_240/draft_vocab.json runs/$a/ ; }
$DA distill cluster/jobs/local.yaml --resume --set name=$a --set learner.lr=1e-3 --set learner.max_steps=120 --set learner.checkpoint_every=60
mkdir -p runs/exp5_eval
$DA eval cluster/jobs/local.yaml --draft base=runs/local-vfill/draft_distilled --draft s1_240_lr1=runs/exp_s1_240_lr1/draft_distilled --draft s1_240_s3_120=runs/exp_s1_240_s3_120/draft_distilled --draft s1_240_only=runs/exp_s1_240/draft_pretrained --set 'eval.tasks=[chat]' --prompts-per-task 32 --out runs/exp5_eval

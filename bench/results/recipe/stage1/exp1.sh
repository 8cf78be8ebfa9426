set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
B=runs/local-vfill
for a in exp_s1_120 exp_T05; do mkdir -p runs/$a; [ -e runs/$a/distill_set ] || ln -s /work/main/$B/distill_set runs/$a/distill_set; done
[ -e runs/exp_T05/draft_pretrained ] || { cp -r $B/draft_pretrained runs/exp_T05/; cp $B/pretrain_done.json $B/draft_vocab.json runs/exp_T05/ ; }
$DA pretrain cluster/jobs/local.yaml --resume --set name=exp_s1_120 --set pretrain.max_steps=120 --set pretrain.checkpoint_every=120 --set pretrain.warmup_steps=8
$DA distill cluster/jobs/local.yaml --resume --set name=exp_s1_120
$DA distill cluster/jobs/local.yaml --resume --set name=exp_T05 --set distill.temperature=0.5
mkdir -p runs/exp1_eval
$DA eval cluster/jobs/local.yaml --draft base=$B/draft_distilled --draft s1_120=runs/exp_s1_120/draft_distilled --draft T05=runs/exp_T05/draft_distilled --draft s1_120_only=runs/exp_s1_120/draft_pretrained --set 'eval.tasks=[chat]' --prompts-per-task 32 --out runs/exp1_eval

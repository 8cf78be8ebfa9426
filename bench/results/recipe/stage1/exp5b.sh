set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
while pgrep -f "draftalign.cli distill" >/dev/null; do sleep 5; done
mkdir -p runs/exp5_eval
$DA eval cluster/jobs/local.yaml --draft s1_240_only=runs/exp_s1_240/draft_pretrained --draft base=runs/local-vfill/draft_distilled --draft s1_240_lr1=runs/exp_s1_240_lr1/draft_distilled --draft s1_240_s3_120=runs/exp_s1_240_s3_120/draft_distilled --set 'eval.tasks=[chat]' --prompts-per-task 32 --out runs/exp5_eval

set -x
cd /tmp/exp
export DRAFTALIGN_CACHE=/work/main/.cache/draftalign PYTHONPATH=/tmp/exp
DA="/work/main/.venv/bin/python -m draftalign.cli"
mkdir -p runs/exp6_eval
$DA eval cluster/jobs/local.yaml --draft fresh_s1=/tmp/fresh/runs/local/draft_pretrained --draft fresh=/tmp/fresh/runs/local/draft_distilled --draft s1_240_only=runs/exp_s1_240/draft_pretrained --draft s1_240_s3_120=runs/exp_s1_240_s3_120/draft_distilled --set 'eval.tasks=[chat]' --prompts-per-task 32 --out runs/exp6_eval

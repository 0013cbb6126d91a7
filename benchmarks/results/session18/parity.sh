# parity ARM CONFIG: 1000 steps on the source corpus; console log to $OUT/ARM.log
arm=$1; config=$2
start=$(date +%s)
scripts/train.sh configs/$config --training.steps=1000 --metrics.log_freq=1 --metrics.no-enable-wandb \
  --training.dataset=coda_offline_source --job.dump_folder=/tmp/parity/$arm > $OUT/$arm.log 2>&1
echo "$arm rc $? wall $(( $(date +%s) - start )) s" >> $OUT/summary.txt

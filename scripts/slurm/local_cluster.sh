#!/usr/bin/env bash
# A real Slurm on this one machine, for tests and trying the sbatch scripts: munge, slurmctld and
# two slurmd "nodes" (n1, n2; 2 CPUs and 2 fake GPUs each), Debian's slurm-wlm 22.05.
#
#   scripts/slurm/local_cluster.sh start [DIR]   install (apt) if needed, configure, start, wait idle
#   scripts/slurm/local_cluster.sh stop  [DIR]
#
# Runs as root (it writes /etc/slurm/slurm.conf and starts daemons). State, logs and the jobcomp
# log (one line per job attempt) live in DIR (default /tmp/mgd3-slurm).
set -euo pipefail
action=${1:?usage: local_cluster.sh start|stop [DIR]}
dir=${2:-/tmp/mgd3-slurm}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  sleep 1
}

if [[ $action == stop ]]; then
  stop
  exit 0
fi
[[ $action == start ]] || { echo "unknown action $action" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "local_cluster.sh must run as root" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi
stop
rm -rf "$dir"
mkdir -p "$dir/ctld" "$dir/spool/n1" "$dir/spool/n2" "$dir/dev"
for i in 0 1; do mknod "$dir/dev/gpu$i" c 1 3; done
chown -R slurm:slurm "$dir/ctld"
touch "$dir/jobcomp.log" && chown slurm:slurm "$dir/jobcomp.log" && chmod 644 "$dir/jobcomp.log"

mkdir -p /etc/slurm /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mgd3local
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=10
KillWait=20
RequeueExit=75
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
NodeName=n[1-2] NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/gres.conf <<CONF
NodeName=n[1-2] Name=gpu File=$dir/dev/gpu[0-1]
CONF

slurmctld
slurmd -N n1
slurmd -N n2
for _ in $(seq 1 60); do
  states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
  [[ $states == "idle " ]] && { echo "local Slurm up: nodes n1 n2 idle (state in $dir)"; exit 0; }
  sleep 1
done
echo "Slurm nodes did not become idle: $(sinfo -N 2>&1)" >&2
tail -20 "$dir/slurmctld.log" "$dir"/slurmd-*.log >&2 || true
exit 1

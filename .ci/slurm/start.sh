#!/usr/bin/env bash
# Install (Debian, as root) and start a single-node SLURM cluster for the `slurm` tests.
# Idempotent: safe to run again; returns once the node is idle. Stop with stop.sh.
# The node is declared with 16 CPUs and 128 GB (SlurmdParameters=config_overrides), so the
# unchanged requests of profiles/slurm fit on a small CI machine. The node offers two fake GPUs (gres with empty device files), so GPU requests are
# accepted and run, and the code falls back to the CPU. Two partitions, `cpu` and `gpu`
# (the names used in profiles/slurm/config.yaml), hold the same node.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then echo "start.sh: needs root (apt-get, munged, slurmd)" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: key and daemon
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# slurm.conf for this host
host=$(hostname -s)
cpus=16
mem=128000
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /var/lib/slurm-fake-gpu
touch /var/lib/slurm-fake-gpu/gpu0 /var/lib/slurm-fake-gpu/gpu1
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=cider-ci
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
GresTypes=gpu
NodeName=${host} CPUs=${cpus} RealMemory=${mem} Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=${host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${host} MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
Name=gpu File=/var/lib/slurm-fake-gpu/gpu0
Name=gpu File=/var/lib/slurm-fake-gpu/gpu1
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in idle*|mix*|alloc*) echo "slurm: node ${host} ${state}"; exit 0 ;; esac
  sleep 1
done
echo "start.sh: SLURM node not ready after 60 s (state '${state:-none}'); see /var/log/slurm" >&2
exit 1

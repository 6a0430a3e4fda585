#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by start.sh.
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true

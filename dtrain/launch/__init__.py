"""Cluster launches: `dtrain launch slurm` renders and submits the job scripts in `launchers/`;
inside a job, `slurm_env` gives the rendezvous address and process counts and `supervise` turns
SLURM's warning signal into a checkpoint and a requeue."""

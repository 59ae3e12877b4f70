"""Ranks and memory: process groups and collectives, DeepSpeed setup, launcher environments (SLURM, MPI), the global
batch across resumes, host memory on CPU."""

"""Launchers: AOT compilation for real TPU topologies (`launch.aot`), the multi-host entry point (`launch.train`),
and the ways to start it on a Cloud TPU pod (`tpu_pod.sh`), a SLURM GPU cluster (`slurm_gpu.sbatch`) and several
local CPU processes (`local_multiprocess.py`). See `launch/README.md` (issue 9).
"""

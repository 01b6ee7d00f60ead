"""Hugging Face checkpoint interop (issue 8; digest §1.1-1.3): config and tensor-name mapping (`mapping`), INT4
pack-quantized experts (`int4`), streaming import/export and the CLI (`hf`, `python -m k25jax.interop.hf`)."""

from k25jax.interop.hf import (DryRunReport, dry_run, export_checkpoint, export_hf, import_checkpoint,
                               load_hf, load_imported, save_imported)
from k25jax.interop.mapping import build_entries, canonical_name, config_from_hf, config_to_hf

__all__ = ["DryRunReport", "build_entries", "canonical_name", "config_from_hf", "config_to_hf", "dry_run",
           "export_checkpoint", "export_hf", "import_checkpoint", "load_hf", "load_imported", "save_imported"]

"""NIfTI volumes → sharded HDF5 training dataset: `config` (the options and their flags), `nifti`
(finding and checking volumes), `plan` (subjects → splits → shards, fingerprint), `subject` (one
subject through the pure array functions of `transforms`), `shards` (HDF5 writing, per-shard
records), `manifest` (manifest.json, written and read back). The command that runs them on every
rank, `hpcgan preprocess`, is hpcgan.commands.preprocess."""

"""NIfTI volumes → sharded HDF5 training dataset: `transforms` (pure array functions), `io`
(finding and checking volumes), `shards` (HDF5 writing), `command` (`hpcgan preprocess`)."""

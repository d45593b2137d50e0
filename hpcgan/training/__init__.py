"""Training a GAN with data parallelism, in named parts:
  config         the YAML schema (model, loss, optim, train, log, checkpoint, eval sections)
  checks         what can be wrong with the input, found on every rank before MPI starts
  state          TrainState: networks, optimizers, scalers, data position, RNG; saves and loads itself
  steps          GanSteps.d_step / g_step and the latents they draw
  loop           run_training: the steps, one agreement collective, the handlers, top to bottom
  handlers       the periodic duties (run record, log, sample grid, evaluation, checkpoints), one lifecycle
                 each, each owning its rank-0 part
  run_directory  rank 0's files in RUN_DIR: config, environment, metrics.jsonl, TensorBoard
  checkpointing  the one checkpoint component: files, background writer, and the Checkpointer through which
                 a run saves, resumes, starts from another run and rolls back
The command (`hpcgan train`, hpcgan/commands/train.py) runs the checks, starts the backend, loads what the
run starts from and calls run_training."""

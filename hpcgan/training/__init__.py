"""Training a GAN with data parallelism, in named parts:
  config       the YAML schema (model, loss, optim, train, log, checkpoint, eval sections)
  state        TrainState: networks, optimizers, scalers, data position, RNG; saves and loads itself
  steps        GanSteps.d_step / g_step and the latents they draw
  loop         run_training: the steps, one agreement collective, the handlers, top to bottom
  handlers     the periodic duties (log, sample grid, evaluation, checkpoint), one lifecycle each
  coordinator  rank 0's run directory: the files the handlers write
The command (`hpcgan train`, hpcgan/train.py) validates the config and data, starts the backend and
calls run_training."""

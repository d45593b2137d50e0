"""The HTML report of a run (`hpcgan report`, hpcgan/commands/report.py), in two parts:
  figures   the PNGs beside the page: loss and metric curves, sample grids over time, the last stack
  sections  the page: what each part shows, or why it is missing
The run's files are read by hpcgan.runs; the HTML pieces shared with the Turing test are hpcgan.pages."""

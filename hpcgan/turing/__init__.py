"""The visual Turing test (`hpcgan turing-test`, hpcgan/commands/turing_test.py), in named parts:
  session  the blinded reading session: its images, page and answer key; reading them and the answers back
  stats    exact binomial test, Clopper-Pearson interval, Fleiss' kappa, the statistics of a set of readings
  scores   the scores of a session's answers: JSON, a terminal table and the section of `hpcgan report`
The readers' page is the template hpcgan/turing/session.html."""

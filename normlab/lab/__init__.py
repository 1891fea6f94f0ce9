"""``normlab lab``: the classic normalization experiments, rerun on bundled data, with an HTML
report. See :mod:`normlab.lab.api` for how an experiment is written."""

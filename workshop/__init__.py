"""The workshop's floor, shared by training, export and the benches: the run-folder contract
(:mod:`capsedge.workshop.run`) and the one reader of labelled image folders
(:mod:`capsedge.workshop.dataset`).

Above :mod:`capsedge` (the runtime) and :mod:`capsedge.models`, below :mod:`capsedge.train` and
:mod:`capsedge.export`, which it never imports. numpy, json and the runtime's preprocessing only:
no TensorFlow.
"""

"""Everything the project makes up: the synthetic head-CT phantom (`drct phantom`: DICOM trees
rendered from analytic anatomy) and the synthetic and planted feature caches of the tests and
benchmarks (the real cache schema, exact truth, no DICOM and no CNN).

Kept apart from the readers (pipeline/data) and from training (pipeline/training, a DVC
dependency of `train`), so that no real code path depends on made-up data: only the `drct phantom`
command (stages/), the tests and the benchmarks import it.
"""

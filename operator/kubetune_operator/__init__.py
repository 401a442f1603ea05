"""The kubetune operator: kopf reconciles FineTuneJob and MergeJob resources into batch/v1 Jobs.

Layout (pure functions first, I/O last):

* :mod:`.builders`   spec -> ConfigMap / ServiceAccount / Role / RoleBinding / Job / MergeJob dicts
* :mod:`.status`     observed Job + pods (+ termination message) -> status dict with conditions
* :mod:`.validation` what the CRD cannot check: Secrets and their keys, the referenced FineTuneJob
* :mod:`.kube`       a small JSON client for the Kubernetes API (dicts in, dicts out)
* :mod:`.controller` the level-based reconcile loop for both kinds (observe -> act -> status)
* :mod:`.handlers`   the kopf handlers: short, they all call :func:`.controller.reconcile`
* :mod:`.metrics`    Prometheus metrics and the health endpoints
* :mod:`.leader`     Lease-based leader election (one active replica)
* :mod:`.cli`        ``kubetune operator``
"""

OPERATOR_NAME = "kubetune-operator"

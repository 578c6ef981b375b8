"""The lifecycle of each resource as pure state machines, shared by the operator and the local backend.

`trainingrun.reconcile` and `modelrelease.reconcile` take what an adapter observed (the spec, the
previous status, the attempts or the deployment it found, the registry, the time) and return the next
status plus the actions to take. Every phase, reason, deadline, restart and rollback decision lives
here; `operators/` (Kubernetes Jobs and RayServices) and `midfill.local` (torchx processes and a local
Ray Serve) only observe and act. No I/O and no heavy imports: the operator image imports this.
"""

"""The update flow: desired state (planned by a pure function), chunk download, verify,
install, probation, device commands, deployment events and the store watcher."""

"""Reader, badge and cabinet simulators: real protocols on real sockets and pseudo-terminals."""

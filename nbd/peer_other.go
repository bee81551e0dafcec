//go:build !linux

package nbd

import "syscall"

// peerHungUp is not checked outside Linux: a connection whose reader waits on
// the device then notices the peer's hang-up only when it reads again, or on
// cancellation.
func peerHungUp(syscall.RawConn) bool { return false }

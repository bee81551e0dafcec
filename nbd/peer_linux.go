//go:build linux

package nbd

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// pollHangup reports, without waiting, whether any of the poll events in
// mask are raised on the socket behind rc (POLLHUP and POLLERR are always
// among those poll can report).
func pollHangup(rc syscall.RawConn, mask int16) bool {
	gone := false
	err := rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		n, err := unix.Poll(pfd, 0)
		gone = err == nil && n == 1 && pfd[0].Revents&mask != 0
	})
	return err == nil && gone
}

// peerHungUp reports whether the peer can take no more replies: both
// directions of the socket are shut (the kernel after a disconnect, a
// client that closed its socket). A peer that only shut its write side
// still reads replies and does not count.
func peerHungUp(rc syscall.RawConn) bool {
	return pollHangup(rc, unix.POLLHUP|unix.POLLERR)
}

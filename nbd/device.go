// Package nbd serves read-only block devices over the NBD protocol: to the
// Linux kernel on an already-connected socket (ServeTransmission), and to
// network clients such as qemu, nbdinfo, nbdcopy and nbdfuse after a fixed
// newstyle handshake (Server).
//
// One transmission engine serves both. Per connection it runs a reader that
// keeps pulling request headers, and a bounded pool of handlers that read
// from the device concurrently, so that a read waiting on a slow device (a
// cold fetch) does not hold up the others. While the device answers fast
// (page cache, memory), the reader serves small reads itself instead:
// waking a handler would cost more than the read. Replies go out in
// whatever order the reads finish, through one writer at a time: whoever
// has a finished reply sends it itself when no write is under way (no
// goroutine switch on an idle connection), or leaves it to the one that is
// writing, which sends everything queued in one writev (batching on a busy
// connection). Header and data always travel in the same writev, and a
// success header is only ever written with its data in hand, so a failed
// device read becomes an EIO reply for that request and nothing else.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Device is what an export serves: random-access reads over a fixed size.
// ReadAt must be safe for concurrent use (os.File and io.SectionReader are).
//
// A device that may wait on a network says so through two optional
// interfaces, found by type assertion:
//
//   - ContextReaderAt: the engine then reads through ReadAtContext with a
//     per-connection context that is cancelled when the connection is torn
//     down (at the latest once TransmissionOptions.DrainTimeout has passed
//     after cancellation or NBD_CMD_DISC, at once when the peer is gone), so
//     a read stuck on an unreachable registry does not hold up shutdown.
//     A device with only ReadAt cannot be interrupted: its stuck read is
//     left behind after the drain timeout (the reply is dropped; its buffer
//     is not reused until the read returns).
//   - Staller: MayStall reporting true sends every read to a handler
//     goroutine instead of letting the connection's reader serve small ones
//     itself while the device answers fast.
type Device interface {
	io.ReaderAt
	Size() int64
}

// ContextReaderAt is a Device whose reads can be cancelled. ReadAtContext
// has ReadAt's contract, and returns soon after ctx is done (with an error,
// unless the data is complete).
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Staller is a Device that knows whether a read may wait a long time (a
// chunk fetched from a registry). MayStall must not change while the device
// is served.
type Staller interface {
	MayStall() bool
}

// mayStall reports whether dev says its reads may stall; devices that do not
// say are taken to answer at page-cache or memory speed.
func mayStall(dev Device) bool {
	s, ok := dev.(Staller)
	return ok && s.MayStall()
}

// Export is one named device offered to network clients.
type Export struct {
	// Name is what clients ask for (nbd://host/NAME). The empty name asks for
	// the default export, which is the first one.
	Name string
	// Description is shown by `nbdinfo --list`; optional.
	Description string
	// Device holds the bytes.
	Device Device
	// BlockSize is the block size clients should prefer (advertised as
	// NBD_INFO_BLOCK_SIZE's preferred size): the filesystem's block size,
	// 512 or 4096. 0 means 4096. Any byte range is still served.
	BlockSize uint32
}

func (e *Export) preferredBlockSize() uint32 {
	if e.BlockSize == 0 {
		return 4096
	}
	return e.BlockSize
}

func (e *Export) validate() error {
	if e.Device == nil {
		return fmt.Errorf("nbd: export %q: no device", e.Name)
	}
	if len(e.Name) > maxNameLength {
		return fmt.Errorf("nbd: export name of %d bytes exceeds %d", len(e.Name), maxNameLength)
	}
	if len(e.Description) > maxNameLength {
		return fmt.Errorf("nbd: export %q: description of %d bytes exceeds %d", e.Name, len(e.Description), maxNameLength)
	}
	if b := e.preferredBlockSize(); b < 512 || b > 64<<10 || b&(b-1) != 0 {
		return fmt.Errorf("nbd: export %q: block size %d is not a power of two in 512..65536", e.Name, b)
	}
	if e.Device.Size() < 0 {
		return fmt.Errorf("nbd: export %q: negative size %d", e.Name, e.Device.Size())
	}
	return nil
}

// errNoDevice is returned by ServeTransmission when given a nil device.
var errNoDevice = errors.New("nbd: no device")

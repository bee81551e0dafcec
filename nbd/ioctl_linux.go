//go:build linux

package nbd

// The legacy ioctl interface on /dev/nbdN (<linux/nbd.h>, doc §1). Used when
// generic netlink is unavailable or asked against. Its rules, each learnt
// the hard way:
//
//   - Every SET_SOCK must come from the thread that started the setup, and
//     NBD_DO_IT blocks that thread for the whole session. So one goroutine,
//     locked to its OS thread, does the setup and DO_IT, and never unlocks:
//     the thread exits with it.
//   - A signal delivered to the thread sleeping in DO_IT makes the driver
//     shut every socket down, and Go's SA_RESTART then reissues DO_IT into
//     EBUSY: a dead device. That thread blocks all signals first.
//   - Opening /dev/nbdN allocates the device's configuration and the last
//     close frees it, so the *os.File stays reachable until the end; keeping
//     only its descriptor lets the finalizer close it under our feet.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlRequest computes _IO(0xab, nr): no direction or size bits. The
// direction field's "none" value is 0 on most architectures but not all
// (see ioctlDirNone), so the number is computed rather than hard-coded.
func ioctlRequest(nr uint) uint {
	const (
		nrShift   = 0
		typeShift = 8
	)
	return ioctlDirNone<<ioctlDirShift | 0xab<<typeShift | nr<<nrShift
}

// NBD ioctl numbers (n of _IO(0xab, n)).
const (
	ioctlSetSock       = 0
	ioctlSetBlockSize  = 1
	ioctlDoIt          = 3
	ioctlClearSock     = 4
	ioctlClearQueue    = 5
	ioctlSetSizeBlocks = 7
	ioctlDisconnect    = 8
	ioctlSetTimeout    = 9
	ioctlSetFlags      = 10
)

// nbdIoctl issues one NBD ioctl with its argument passed by value. The
// file's descriptor stays valid for the duration of the call.
func nbdIoctl(f *os.File, nr uint, arg uintptr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	ctlErr := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(ioctlRequest(nr)), arg)
	})
	if ctlErr != nil {
		return ctlErr
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// ioctlName is for error messages.
func ioctlName(nr uint) string {
	switch nr {
	case ioctlSetSock:
		return "NBD_SET_SOCK"
	case ioctlSetBlockSize:
		return "NBD_SET_BLKSIZE"
	case ioctlDoIt:
		return "NBD_DO_IT"
	case ioctlClearSock:
		return "NBD_CLEAR_SOCK"
	case ioctlClearQueue:
		return "NBD_CLEAR_QUE"
	case ioctlSetSizeBlocks:
		return "NBD_SET_SIZE_BLOCKS"
	case ioctlDisconnect:
		return "NBD_DISCONNECT"
	case ioctlSetTimeout:
		return "NBD_SET_TIMEOUT"
	case ioctlSetFlags:
		return "NBD_SET_FLAGS"
	}
	return fmt.Sprintf("NBD ioctl %d", nr)
}

// nbdIoctlNamed is nbdIoctl with the ioctl's name in the error; EBUSY (the
// device is someone else's) is also errDeviceBusy.
func nbdIoctlNamed(f *os.File, nr uint, arg uintptr) error {
	err := nbdIoctl(f, nr, arg)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %s: %w", errDeviceBusy, ioctlName(nr), err)
	}
	return fmt.Errorf("%s: %w", ioctlName(nr), err)
}

// ioctlSetup is what the session thread needs to configure a device.
type ioctlSetup struct {
	path           string
	sizeBytes      int64
	blockSize      int64
	timeoutSeconds uint64
	flags          uint64
	socketFDs      []int
}

// ioctlSession is a running ioctl-attached device. done is closed when
// NBD_DO_IT has returned and the device file is closed; doItErr is then set.
type ioctlSession struct {
	file    *os.File
	done    chan struct{}
	doItErr error
}

// startIoctlSession opens the device, configures it and starts NBD_DO_IT on
// a dedicated thread. It returns once the setup succeeded (DO_IT may still
// fail afterwards, e.g. EBUSY when another server raced us: watch done) or
// with the setup's error.
func startIoctlSession(s ioctlSetup) (*ioctlSession, error) {
	f, err := os.OpenFile(s.path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	sess := &ioctlSession{file: f, done: make(chan struct{})}
	setupErr := make(chan error, 1)
	go sess.run(s, setupErr)
	if err := <-setupErr; err != nil {
		<-sess.done
		return nil, err
	}
	return sess, nil
}

// run is the session thread: setup, DO_IT, cleanup. It is the only place
// that closes the file.
func (sess *ioctlSession) run(s ioctlSetup, setupErr chan<- error) {
	defer close(sess.done)
	defer sess.file.Close()
	// Never unlocked: the thread's signal mask is changed below, so it must
	// die with this goroutine rather than return to the scheduler.
	runtime.LockOSThread()
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		setupErr <- fmt.Errorf("blocking signals on the NBD_DO_IT thread: %w", err)
		return
	}
	if err := sess.configure(s); err != nil {
		// Leave nothing half-configured behind.
		_ = nbdIoctl(sess.file, ioctlClearSock, 0)
		setupErr <- err
		return
	}
	setupErr <- nil
	err := nbdIoctlNamed(sess.file, ioctlDoIt, 0)
	// The driver fails queued I/O and forgets the sockets; CLEAR_QUE is a
	// no-op on current kernels, kept for old ones.
	_ = nbdIoctl(sess.file, ioctlClearQueue, 0)
	_ = nbdIoctl(sess.file, ioctlClearSock, 0)
	sess.doItErr = err
}

func (sess *ioctlSession) configure(s ioctlSetup) error {
	f := sess.file
	// A busy device has a capacity; refuse it rather than hijack it (its
	// configuration would be reset by CLEAR_SOCK below).
	var size uint64
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("BLKGETSIZE64: %w", errno)
	}
	if size != 0 {
		return fmt.Errorf("%w: it has a size of %d bytes", errDeviceBusy, size)
	}
	steps := []struct {
		nr  uint
		arg uintptr
	}{
		{ioctlClearSock, 0},
		// Order matters: SIZE_BLOCKS counts in the block size then in force.
		{ioctlSetBlockSize, uintptr(s.blockSize)},
		{ioctlSetSizeBlocks, uintptr(s.sizeBytes / s.blockSize)},
		{ioctlSetFlags, uintptr(s.flags)},
	}
	if s.timeoutSeconds > 0 {
		steps = append(steps, struct {
			nr  uint
			arg uintptr
		}{ioctlSetTimeout, uintptr(s.timeoutSeconds)})
	}
	for _, st := range steps {
		if err := nbdIoctlNamed(f, st.nr, st.arg); err != nil {
			return err
		}
	}
	for _, fd := range s.socketFDs {
		if err := nbdIoctlNamed(f, ioctlSetSock, uintptr(fd)); err != nil {
			return err
		}
	}
	return nil
}

// disconnect asks the driver to end the session: it sends NBD_CMD_DISC on
// every socket, and DO_IT returns once the servers have closed their ends.
func (sess *ioctlSession) disconnect() error {
	select {
	case <-sess.done:
		return nil // already over; the file is closed
	default:
	}
	return nbdIoctlNamed(sess.file, ioctlDisconnect, 0)
}

// wait waits for DO_IT to return or ctx to end.
func (sess *ioctlSession) wait(ctx context.Context) error {
	select {
	case <-sess.done:
		return sess.doItErr
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// errDeviceBusy marks a device someone else is using.
var errDeviceBusy = errors.New("device busy")

// ioctlDisconnectDevice ends the session of a device this process does not
// own (`rafsnbd nbd disconnect` without netlink). Opening the device briefly
// holds a configuration reference; that is harmless here.
func ioctlDisconnectDevice(index int) error {
	f, err := os.OpenFile(DevicePath(index), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := nbdIoctlNamed(f, ioctlDisconnect, 0); err != nil {
		return err
	}
	return nil
}

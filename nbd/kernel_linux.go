//go:build linux

package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// KernelAttachment is a Device served to the kernel as /dev/nbdN. It runs
// one transmission engine per connection until Detach, or until the kernel
// ends the session on its own (another process disconnected the device, or
// every socket died); Done reports the latter.
type KernelAttachment struct {
	// Index is N of /dev/nbdN.
	Index int
	// Path is "/dev/nbdN".
	Path string
	// Method is MethodNetlink or MethodIoctl.
	Method string
	// Reattached is true when an existing device with the same backend
	// identifier was given fresh sockets (NBD_CMD_RECONFIGURE) instead of a
	// new device being created.
	Reattached bool
	// Connections is how many sockets this process serves.
	Connections int

	backendID   string
	log         *zerolog.Logger
	serveCancel context.CancelFunc
	abort       chan struct{} // closed by Detach: the servers stop without a drain
	drain       time.Duration // the servers' DrainTimeout
	servers     sync.WaitGroup
	done        chan struct{} // closed once every server has returned
	detaching   atomic.Bool
	ioctl       *ioctlSession // nil on netlink

	mu       sync.Mutex
	serveErr error // first connection that ended other than by NBD_CMD_DISC
}

// AttachKernel attaches dev to the kernel's NBD driver and serves it until
// Detach. It returns once /sys/block/nbdN/size shows dev's size, so the
// device can be mounted right away. Generic netlink is tried first; the
// ioctl interface is the fallback (or the choice, with UseIoctl).
//
// With a BackendID on netlink, an existing device carrying that identifier
// is reattached: its dead sockets are replaced by ours, and a filesystem
// mounted on it carries on. If every socket of that device is still alive,
// another process serves it and AttachKernel fails.
//
// Without the nbd driver the error is ErrKernelNBDMissing. ctx bounds the
// setup only; the attachment lives until Detach.
func AttachKernel(ctx context.Context, dev Device, opts KernelOptions) (*KernelAttachment, error) {
	if err := opts.validate(dev); err != nil {
		return nil, err
	}
	log := opts.logger()
	if !opts.UseIoctl {
		nl, err := dialNBDNetlink()
		switch {
		case err == nil:
			defer nl.Close()
			return attachNetlink(ctx, nl, dev, &opts)
		case errors.Is(err, errNLFamilyMissing):
			if !nbdModuleLoaded() {
				return nil, fmt.Errorf("%w (the kernel has no generic netlink family %q and no /sys/module/nbd)", ErrKernelNBDMissing, nlFamilyName)
			}
			log.Warn().Msg("nbd: the driver has no generic netlink interface (kernel older than 4.12?); using ioctls")
		default:
			log.Warn().Err(err).Msg("nbd: generic netlink unavailable; using ioctls")
		}
	}
	if !nbdModuleLoaded() {
		return nil, fmt.Errorf("%w (no /sys/module/nbd, no /sys/block/nbd*)", ErrKernelNBDMissing)
	}
	return attachIoctl(ctx, dev, &opts)
}

// kernelSocketPair is one connection: the kernel's end and ours.
type kernelSocketPair struct {
	kernel *os.File
	server *os.File
}

func newKernelSocketPairs(n int) ([]kernelSocketPair, error) {
	pairs := make([]kernelSocketPair, 0, n)
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeKernelSocketPairs(pairs)
			return nil, fmt.Errorf("nbd: socketpair: %w", err)
		}
		pairs = append(pairs, kernelSocketPair{
			kernel: os.NewFile(uintptr(fds[0]), "nbd-kernel"),
			server: os.NewFile(uintptr(fds[1]), "nbd-server"),
		})
	}
	return pairs, nil
}

func kernelFDs(pairs []kernelSocketPair) []int {
	fds := make([]int, len(pairs))
	for i, p := range pairs {
		fds[i] = int(p.kernel.Fd())
	}
	return fds
}

// closeKernelEnds drops our copies of the kernel's ends. The driver holds its
// own reference to every socket it accepted; one it did not accept is then
// fully closed, which our end sees as a hang-up.
func closeKernelEnds(pairs []kernelSocketPair) {
	for i := range pairs {
		if pairs[i].kernel != nil {
			pairs[i].kernel.Close()
			pairs[i].kernel = nil
		}
	}
}

// handOver makes n socket pairs, gives the kernel's ends to the driver with
// give (a netlink or ioctl call taking their descriptors), and drops our
// copies of those ends. On error nothing is left open.
func handOver(n int, give func(fds []int) error) ([]kernelSocketPair, error) {
	pairs, err := newKernelSocketPairs(n)
	if err != nil {
		return nil, err
	}
	err = give(kernelFDs(pairs))
	closeKernelEnds(pairs)
	if err != nil {
		closeKernelSocketPairs(pairs)
		return nil, err
	}
	return pairs, nil
}

func closeKernelSocketPairs(pairs []kernelSocketPair) {
	closeKernelEnds(pairs)
	for i := range pairs {
		if pairs[i].server != nil {
			pairs[i].server.Close()
			pairs[i].server = nil
		}
	}
}

// hungUp reports whether the peer of a server end is gone, without waiting.
func hungUp(f *os.File) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return true
	}
	return pollHangup(rc, unix.POLLHUP|unix.POLLRDHUP|unix.POLLERR)
}

// serverConns turns server ends into net.Conns (which own dups of them) and
// closes the originals.
func serverConns(pairs []kernelSocketPair) ([]net.Conn, error) {
	conns := make([]net.Conn, 0, len(pairs))
	for i := range pairs {
		c, err := net.FileConn(pairs[i].server)
		pairs[i].server.Close()
		pairs[i].server = nil
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			closeKernelSocketPairs(pairs)
			return nil, fmt.Errorf("nbd: socket: %w", err)
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func newKernelAttachment(index int, method string, o *KernelOptions) *KernelAttachment {
	return &KernelAttachment{
		Index:     index,
		Path:      DevicePath(index),
		Method:    method,
		backendID: o.BackendID,
		log:       o.logger(),
		done:      make(chan struct{}),
		abort:     make(chan struct{}),
		drain:     o.Transmission.drainTimeout(),
	}
}

// serve starts one transmission engine per connection. The engines get a
// context of their own, not the caller's: cancelling setup or receiving a
// signal must lead to an orderly Detach, never to sockets closing under a
// mounted filesystem.
func (a *KernelAttachment) serve(conns []net.Conn, dev Device, opts TransmissionOptions) {
	ctx, cancel := context.WithCancel(context.Background())
	a.serveCancel = cancel
	opts.abort = a.abort
	a.Connections = len(conns)
	a.servers.Add(len(conns))
	for i, conn := range conns {
		go func() {
			defer a.servers.Done()
			a.connectionEnded(i, ServeTransmission(ctx, conn, dev, opts))
		}()
	}
	go func() {
		a.servers.Wait()
		close(a.done)
	}()
}

func (a *KernelAttachment) connectionEnded(i int, err error) {
	switch {
	case err == nil:
		a.log.Debug().Int("connection", i).Str("device", a.Path).Msg("nbd: kernel disconnected")
		return
	case a.detaching.Load() && errors.Is(err, io.EOF):
		// The driver shuts sockets down right after NBD_CMD_DISC.
		return
	}
	a.log.Warn().Err(err).Int("connection", i).Str("device", a.Path).Msg("nbd: connection ended")
	a.mu.Lock()
	if a.serveErr == nil {
		a.serveErr = fmt.Errorf("nbd: %s connection %d: %w", a.Path, i, err)
	}
	a.mu.Unlock()
}

// Done is closed when every connection has ended: after Detach, or when the
// kernel ended the session by itself.
func (a *KernelAttachment) Done() <-chan struct{} { return a.done }

// Err returns the first connection that ended abnormally (the kernel closed
// it without NBD_CMD_DISC, or the stream broke), or nil.
func (a *KernelAttachment) Err() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.serveErr
}

// Detach disconnects the device (the kernel sends NBD_CMD_DISC on every
// socket and fails any later I/O, so unmount first) and waits for the
// connections to end: at most the transmission's DrainTimeout, or until ctx
// is done, after which the sockets are closed from our side and device reads
// still running are cancelled (or left behind, on a device that cannot be
// cancelled), so Detach returns soon after even when a read never does.
// Detaching twice, or after the kernel ended the session, is harmless.
func (a *KernelAttachment) Detach(ctx context.Context) error {
	if a.detaching.Swap(true) {
		<-a.done
		return nil
	}
	var err error
	select {
	case <-a.done:
		// The session is over already. Disconnecting by index now could hit
		// a device someone else has attached since.
	default:
		err = a.disconnect()
	}
	drain := time.NewTimer(a.drain)
	defer drain.Stop()
	select {
	case <-a.done:
	case <-drain.C:
		a.log.Warn().Str("device", a.Path).Msg("nbd: the connections did not end within the drain timeout; closing them")
	case <-ctx.Done():
	}
	close(a.abort)
	a.serveCancel()
	<-a.done
	if a.ioctl != nil {
		// DO_IT returns once every socket is gone. Its own error says little
		// (see doc §1.2 step 8), so only a DO_IT that never returns counts.
		wctx, cancel := context.WithTimeout(context.Background(), a.drain)
		werr := a.ioctl.wait(wctx)
		cancel()
		switch {
		case errors.Is(werr, context.DeadlineExceeded):
			if err == nil {
				err = fmt.Errorf("nbd: %s: NBD_DO_IT did not return after the disconnect", a.Path)
			}
		case werr != nil:
			a.log.Debug().Err(werr).Str("device", a.Path).Msg("nbd: NBD_DO_IT returned an error")
		}
	}
	return err
}

func (a *KernelAttachment) disconnect() error {
	if a.ioctl != nil {
		if err := a.ioctl.disconnect(); err != nil {
			return fmt.Errorf("nbd: %s: %w", a.Path, err)
		}
		return nil
	}
	nl, err := dialNBDNetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	if a.backendID != "" {
		// A device that no longer carries our identifier is not ours.
		if got, ok := (sysfsDevice{sysBlock, a.Index}).backend(); ok && got != a.backendID {
			return fmt.Errorf("nbd: %s now has backend %q, not %q: not disconnecting it", a.Path, got, a.backendID)
		}
	}
	if err := nl.disconnect(a.Index); err != nil {
		return fmt.Errorf("nbd: %s: netlink disconnect: %w", a.Path, err)
	}
	return nil
}

// attachNetlink creates a device with NBD_CMD_CONNECT, or reattaches to the
// one carrying our backend identifier.
func attachNetlink(ctx context.Context, nl *nlClient, dev Device, o *KernelOptions) (*KernelAttachment, error) {
	if index, ok := findByBackend(sysBlock, o.BackendID, o.Index); ok {
		return reattachNetlink(nl, dev, o, index)
	}
	var index int
	pairs, err := handOver(o.connections(), func(fds []int) (err error) {
		index, err = nl.connect(nlConnectRequest{
			Index:           o.Index,
			SizeBytes:       uint64(dev.Size()),
			BlockSizeBytes:  uint64(o.blockSize()),
			TimeoutSeconds:  uint64(o.Timeout / time.Second),
			DeadConnSeconds: uint64(o.DeadConnTimeout / time.Second),
			ServerFlags:     uint64(ReadOnlyFlags),
			BackendID:       o.BackendID,
			SocketFDs:       fds,
		})
		if err != nil {
			return connectError(err, o.Index)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	conns, err := serverConns(pairs)
	if err != nil {
		disconnectQuietly(nl, index)
		return nil, err
	}
	a := newKernelAttachment(index, MethodNetlink, o)
	a.serve(conns, dev, o.Transmission)
	if err := waitReady(ctx, sysfsDevice{sysBlock, index}, dev.Size(), false, o.readyTimeout(), a.done); err != nil {
		_ = a.Detach(context.Background())
		return nil, fmt.Errorf("nbd: %s: %w", a.Path, err)
	}
	a.log.Debug().Str("device", a.Path).Int("connections", a.Connections).Msg("nbd: attached with netlink")
	return a, nil
}

// reattachNetlink hands fresh sockets to a running device with
// NBD_CMD_RECONFIGURE. The driver puts each socket into a dead slot and
// silently drops the rest, so which ones it kept is learnt from whether
// their peers hung up once our copies of the kernel ends are closed.
func reattachNetlink(nl *nlClient, dev Device, o *KernelOptions, index int) (*KernelAttachment, error) {
	path := DevicePath(index)
	have, err := sysfsDevice{sysBlock, index}.sizeBytes()
	if err != nil {
		return nil, fmt.Errorf("nbd: %s: %w", path, err)
	}
	if have != dev.Size() {
		return nil, fmt.Errorf("nbd: %s carries backend %q but has %d bytes, and this device %d: refusing to reattach a different image", path, o.BackendID, have, dev.Size())
	}
	// If another server is still alive this also sets the device's timeouts
	// to ours before its sockets turn out to be taken; they are the values
	// a restarted server would set anyway.
	pairs, err := handOver(o.connections(), func(fds []int) error {
		err := nl.reconfigure(nlReconfigureRequest{
			Index:           index,
			TimeoutSeconds:  uint64(o.Timeout / time.Second),
			DeadConnSeconds: uint64(o.DeadConnTimeout / time.Second),
			BackendID:       o.BackendID,
			SocketFDs:       fds,
		})
		if err != nil {
			return fmt.Errorf("nbd: %s: netlink reconfigure: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var accepted []kernelSocketPair
	for _, p := range pairs {
		if hungUp(p.server) {
			p.server.Close()
			continue
		}
		accepted = append(accepted, p)
	}
	if len(accepted) == 0 {
		return nil, fmt.Errorf("nbd: %s (backend %q) is still served: none of its connections is dead, so another process is serving it; stop that one first or use another backend identifier", path, o.BackendID)
	}
	log := o.logger()
	if len(accepted) < len(pairs) {
		log.Warn().Str("device", path).Int("accepted", len(accepted)).Int("offered", len(pairs)).
			Msg("nbd: the device took fewer sockets than offered (it has fewer dead connections)")
	}
	conns, err := serverConns(accepted)
	if err != nil {
		return nil, err
	}
	a := newKernelAttachment(index, MethodNetlink, o)
	a.Reattached = true
	a.serve(conns, dev, o.Transmission)
	log.Info().Str("device", path).Int("connections", a.Connections).Msg("nbd: reattached to a running device")
	return a, nil
}

func disconnectQuietly(nl *nlClient, index int) { _ = nl.disconnect(index) }

// connectError explains the usual CONNECT failures.
func connectError(err error, index int) error {
	switch {
	case errors.Is(err, unix.EBUSY) && index != AnyDevice:
		return fmt.Errorf("nbd: %s is in use: %w", DevicePath(index), err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("nbd: netlink connect needs root (CAP_SYS_ADMIN in the initial namespace): %w", err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("nbd: netlink connect rejected (block size, size or flags not accepted by this kernel): %w", err)
	}
	return fmt.Errorf("nbd: netlink connect: %w", err)
}

// attachIoctl attaches through /dev/nbdN ioctls, to the given device or to
// the first idle one.
func attachIoctl(ctx context.Context, dev Device, o *KernelOptions) (*KernelAttachment, error) {
	if o.Index != AnyDevice {
		return attachIoctlAt(ctx, dev, o, o.Index)
	}
	indexes, err := sysfsIndexes(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("nbd: listing devices: %w", err)
	}
	for _, index := range indexes {
		d := sysfsDevice{sysBlock, index}
		if size, err := d.sizeBytes(); err != nil || size != 0 || d.pid() != 0 {
			continue
		}
		a, err := attachIoctlAt(ctx, dev, o, index)
		if errors.Is(err, errDeviceBusy) {
			continue // taken since we looked
		}
		return a, err
	}
	return nil, fmt.Errorf("nbd: no idle /dev/nbdN among %d devices (raise nbds_max, or free one)", len(indexes))
}

func attachIoctlAt(ctx context.Context, dev Device, o *KernelOptions, index int) (*KernelAttachment, error) {
	path := DevicePath(index)
	var sess *ioctlSession
	pairs, err := handOver(o.connections(), func(fds []int) (err error) {
		sess, err = startIoctlSession(ioctlSetup{
			path:           path,
			sizeBytes:      dev.Size(),
			blockSize:      o.blockSize(),
			timeoutSeconds: uint64(o.Timeout / time.Second),
			flags:          uint64(ReadOnlyFlags),
			socketFDs:      fds,
		})
		if err != nil {
			return fmt.Errorf("nbd: %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	conns, err := serverConns(pairs)
	if err != nil {
		_ = sess.disconnect()
		return nil, err
	}
	a := newKernelAttachment(index, MethodIoctl, o)
	a.ioctl = sess
	a.serve(conns, dev, o.Transmission)
	if err := waitReady(ctx, sysfsDevice{sysBlock, index}, dev.Size(), true, o.readyTimeout(), sess.done); err != nil {
		_ = a.Detach(context.Background())
		select {
		case <-sess.done:
			if sess.doItErr != nil {
				return nil, fmt.Errorf("nbd: %s: %w", path, sess.doItErr)
			}
		default:
		}
		return nil, fmt.Errorf("nbd: %s: %w", path, err)
	}
	a.log.Debug().Str("device", path).Int("connections", a.Connections).Msg("nbd: attached with ioctls")
	return a, nil
}

// KernelStatus lists every NBD device the driver knows, with its backend
// identifier, size and session pid from sysfs. It uses netlink STATUS when
// available and sysfs alone otherwise.
func KernelStatus() ([]KernelDeviceStatus, error) {
	var list []nlDeviceStatus
	nl, err := dialNBDNetlink()
	switch {
	case err == nil:
		defer nl.Close()
		list, err = nl.status()
		if err != nil {
			return nil, fmt.Errorf("nbd: netlink status: %w", err)
		}
	case errors.Is(err, errNLFamilyMissing):
		if !nbdModuleLoaded() {
			return nil, ErrKernelNBDMissing
		}
		indexes, err := sysfsIndexes(sysBlock)
		if err != nil {
			return nil, fmt.Errorf("nbd: listing devices: %w", err)
		}
		for _, index := range indexes {
			list = append(list, nlDeviceStatus{Index: index, Connected: sysfsDevice{sysBlock, index}.pid() != 0})
		}
	default:
		return nil, err
	}
	out := make([]KernelDeviceStatus, 0, len(list))
	for _, st := range list {
		d := sysfsDevice{sysBlock, st.Index}
		size, _ := d.sizeBytes()
		backend, _ := d.backend()
		out = append(out, KernelDeviceStatus{
			Index:     st.Index,
			Path:      DevicePath(st.Index),
			Connected: st.Connected,
			SizeBytes: size,
			BackendID: backend,
			PID:       d.pid(),
		})
	}
	slices.SortFunc(out, func(a, b KernelDeviceStatus) int { return a.Index - b.Index })
	return out, nil
}

// DisconnectKernel ends the session of /dev/nbdN, whoever serves it: the
// kernel sends NBD_CMD_DISC on its sockets (its server then exits) and any
// further I/O fails, so unmount first.
func DisconnectKernel(index int) error {
	if index < 0 {
		return fmt.Errorf("nbd: device index %d is negative", index)
	}
	path := DevicePath(index)
	if !(sysfsDevice{sysBlock, index}).exists() {
		if !nbdModuleLoaded() {
			return ErrKernelNBDMissing
		}
		return fmt.Errorf("nbd: %s does not exist", path)
	}
	nl, err := dialNBDNetlink()
	if err == nil {
		defer nl.Close()
		if err := nl.disconnect(index); err != nil {
			return fmt.Errorf("nbd: %s: netlink disconnect: %w", path, err)
		}
		return nil
	}
	if !errors.Is(err, errNLFamilyMissing) {
		return err
	}
	if err := ioctlDisconnectDevice(index); err != nil {
		return fmt.Errorf("nbd: %s: %w", path, err)
	}
	return nil
}

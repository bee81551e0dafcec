package nbd

// Attaching a Device to the Linux kernel's NBD driver (/dev/nbdN).
//
// The kernel never handshakes: we create a socketpair, give one end to the
// driver together with the export's size, block size and flags, and run
// ServeTransmission on the other end. Two control interfaces exist (see
// /work/shared/docs/nbd-kernel.md §1–§2):
//
//   - generic netlink (family "nbd", Linux ≥ 4.12), preferred: the kernel can
//     pick a free device, the device outlives our process until DISCONNECT,
//     a backend identifier tags it, and RECONFIGURE hands a restarted server's
//     fresh sockets to a device that is still mounted;
//   - the legacy ioctls on /dev/nbdN, kept as a fallback: one thread blocks in
//     NBD_DO_IT for the whole session and the device dies with the process.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// ErrKernelNBDMissing is returned when neither the nbd generic netlink
// family nor any /dev/nbdN exists: the nbd module is not loaded (or the
// kernel was built without it).
var ErrKernelNBDMissing = errors.New("kernel nbd driver not loaded: modprobe nbd")

// Attach methods, as reported by KernelAttachment.Method.
const (
	MethodNetlink = "netlink"
	MethodIoctl   = "ioctl"
)

// AnyDevice as KernelOptions.Index lets the kernel (netlink) or rafsnbd
// (ioctl) choose a free /dev/nbdN.
const AnyDevice = -1

// Bounds on what KernelOptions accepts. The kernel itself allows more
// connections, but each one is a blk-mq hardware queue of 128 requests and a
// goroutine pool of ours; beyond the CPU count they buy nothing.
const (
	maxKernelConnections = 32
	minKernelBlockSize   = 512
	maxKernelBlockSize   = 64 << 10
	// defaultReadyTimeout bounds the wait for /sys/block/nbdN/size to show
	// the device's capacity; generous for loaded or emulated machines.
	defaultReadyTimeout = 30 * time.Second
)

// KernelOptions say how to attach a Device to the kernel's NBD driver.
type KernelOptions struct {
	// Index is N of /dev/nbdN, or AnyDevice to take a free one.
	Index int
	// Connections is the number of sockets (blk-mq hardware queues) the
	// device gets, each served concurrently; 0 means 1. With netlink the
	// count is fixed when the device is created.
	Connections int
	// BlockSize is the logical block size the device exposes, a power of two
	// from 512 to 65536 that must not exceed the filesystem's block size:
	// pass the EROFS image's block size (4096, or 512 for tarfs images).
	// 0 means 4096. The device size must be a multiple of it.
	BlockSize int64
	// Timeout is the per-request timeout. 0 (the default) never fails a
	// request: the kernel logs "possible stuck request" every 30 s and
	// re-sends requests that were lost with a dead socket once a new one is
	// attached. A positive value marks a socket dead when one request takes
	// longer, which also kills a healthy but slow server, so use it only
	// when every read is bounded (whole seconds; netlink and ioctl).
	Timeout time.Duration
	// DeadConnTimeout (netlink only) is how long I/O waits for a new socket
	// when every socket is dead, e.g. between a crashed rafsnbd and its
	// restart. Reads block in the meantime instead of failing with EIO.
	// Whole seconds; 0 fails such I/O at once.
	DeadConnTimeout time.Duration
	// BackendID (netlink only) tags the device; it shows in
	// /sys/block/nbdN/backend. If a device with this tag exists, AttachKernel
	// reattaches to it with RECONFIGURE instead of creating a new one, so a
	// restarted server resumes a device that is still mounted.
	BackendID string
	// UseIoctl skips netlink and uses the legacy ioctl interface.
	UseIoctl bool
	// Transmission is passed to ServeTransmission for every connection. Its
	// DrainTimeout also bounds Detach.
	Transmission TransmissionOptions
	// ReadyTimeout bounds the wait until the kernel shows the device's size;
	// 0 means 30 s.
	ReadyTimeout time.Duration
	// Logger receives progress and diagnostics; nil discards them.
	Logger *zerolog.Logger
}

func (o *KernelOptions) connections() int {
	if o.Connections <= 0 {
		return 1
	}
	return o.Connections
}

func (o *KernelOptions) blockSize() int64 {
	if o.BlockSize == 0 {
		return 4096
	}
	return o.BlockSize
}

func (o *KernelOptions) readyTimeout() time.Duration {
	if o.ReadyTimeout <= 0 {
		return defaultReadyTimeout
	}
	return o.ReadyTimeout
}

func (o *KernelOptions) logger() *zerolog.Logger {
	if o.Logger == nil {
		nop := zerolog.Nop()
		return &nop
	}
	return o.Logger
}

// validate checks the options against the device before anything touches
// the kernel, so that mistakes get a clear message instead of an EINVAL.
func (o *KernelOptions) validate(dev Device) error {
	if dev == nil {
		return errNoDevice
	}
	if o.Index < AnyDevice {
		return fmt.Errorf("nbd: device index %d is negative", o.Index)
	}
	if n := o.connections(); n > maxKernelConnections {
		return fmt.Errorf("nbd: %d connections requested, at most %d", n, maxKernelConnections)
	}
	bs := o.blockSize()
	if bs < minKernelBlockSize || bs > maxKernelBlockSize || bs&(bs-1) != 0 {
		return fmt.Errorf("nbd: block size %d is not a power of two in %d..%d", bs, minKernelBlockSize, maxKernelBlockSize)
	}
	size := dev.Size()
	if size <= 0 {
		return fmt.Errorf("nbd: device size %d: the kernel needs a non-empty device", size)
	}
	if size%bs != 0 {
		return fmt.Errorf("nbd: device size %d is not a multiple of the block size %d", size, bs)
	}
	if o.Timeout < 0 || o.DeadConnTimeout < 0 {
		return fmt.Errorf("nbd: negative timeout")
	}
	if o.Timeout%time.Second != 0 || o.DeadConnTimeout%time.Second != 0 {
		return fmt.Errorf("nbd: the kernel takes timeouts in whole seconds (got %v and %v)", o.Timeout, o.DeadConnTimeout)
	}
	if strings.ContainsRune(o.BackendID, 0) {
		return fmt.Errorf("nbd: backend identifier contains a NUL byte")
	}
	if len(o.BackendID) > maxBackendIDLength {
		return fmt.Errorf("nbd: backend identifier of %d bytes exceeds %d", len(o.BackendID), maxBackendIDLength)
	}
	if o.UseIoctl && o.BackendID != "" {
		// Not an error: the identifier only matters to netlink. Callers may
		// pass one unconditionally.
		o.logger().Debug().Msg("nbd: backend identifier ignored on the ioctl path")
	}
	return nil
}

// maxBackendIDLength keeps the identifier well inside one sysfs page (the
// kernel prints it with a newline into a 4 KiB buffer).
const maxBackendIDLength = 1024

// DevicePath returns "/dev/nbdN".
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// ParseDevice turns "/dev/nbdN", "nbdN" or "N" into N, and "auto" or "" into
// AnyDevice.
func ParseDevice(s string) (int, error) {
	if s == "" || s == "auto" {
		return AnyDevice, nil
	}
	name := strings.TrimPrefix(s, "/dev/")
	name = strings.TrimPrefix(name, "nbd")
	n, err := strconv.Atoi(name)
	if err != nil || n < 0 || strconv.Itoa(n) != name {
		return 0, fmt.Errorf("nbd: %q is not an NBD device (want /dev/nbdN, nbdN, N or auto)", s)
	}
	return n, nil
}

// sysBlock is where the driver's per-device attributes live. The helpers
// below take the root as a parameter so that tests can use a fake tree.
const sysBlock = "/sys/block"

// sysfsDevice reads the kernel's view of one device from sysfs.
type sysfsDevice struct {
	root  string // normally /sys/block
	index int
}

func (d sysfsDevice) path(name string) string {
	return filepath.Join(d.root, "nbd"+strconv.Itoa(d.index), name)
}

// exists reports whether the kernel has created nbdN at all.
func (d sysfsDevice) exists() bool {
	_, err := os.Stat(d.path(""))
	return err == nil
}

// sizeBytes is the capacity the block layer shows (size is in 512-byte
// sectors whatever the logical block size).
func (d sysfsDevice) sizeBytes() (int64, error) {
	b, err := os.ReadFile(d.path("size"))
	if err != nil {
		return 0, err
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", d.path("size"), err)
	}
	return sectors * 512, nil
}

// pid is the process that started the session; the file exists only while
// one runs. 0 when absent.
func (d sysfsDevice) pid() int {
	b, err := os.ReadFile(d.path("pid"))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return threadGroup(n)
}

// threadGroup maps a thread id to its process id. The driver records the
// id of the thread that started the session (for us a Go runtime thread),
// which users know only by its process. An id whose thread is gone is
// returned as it is.
func threadGroup(tid int) int {
	if tid <= 0 {
		return tid
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(tid) + "/status")
	if err != nil {
		return tid
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n > 0 {
				return n
			}
		}
	}
	return tid
}

// backend is the netlink backend identifier; the file exists only while a
// netlink-configured device has one.
func (d sysfsDevice) backend() (string, bool) {
	b, err := os.ReadFile(d.path("backend"))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(string(b), "\n"), true
}

// sysfsIndexes lists the N of every nbdN under root, in ascending order.
func sysfsIndexes(root string) ([]int, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "nbd")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 {
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out, nil
}

// findByBackend returns the device whose backend identifier is id; when
// index is not AnyDevice only that device is considered.
func findByBackend(root string, id string, index int) (int, bool) {
	if id == "" {
		return 0, false
	}
	if index != AnyDevice {
		got, ok := sysfsDevice{root, index}.backend()
		return index, ok && got == id
	}
	indexes, err := sysfsIndexes(root)
	if err != nil {
		return 0, false
	}
	for _, n := range indexes {
		if got, ok := (sysfsDevice{root, n}).backend(); ok && got == id {
			return n, true
		}
	}
	return 0, false
}

// nbdModuleLoaded reports whether the nbd driver is present, loaded as a
// module or built in (both show /sys/module/nbd, and devices under
// /sys/block).
func nbdModuleLoaded() bool {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		return true
	}
	indexes, err := sysfsIndexes(sysBlock)
	return err == nil && len(indexes) > 0
}

// waitReady polls sysfs until the device shows the expected capacity (and,
// when needPID, the session pid file). Waiting for the pid file alone is not
// enough: the driver creates it before it commits the size, and a mount in
// between finds an empty device.
func waitReady(ctx context.Context, d sysfsDevice, wantBytes int64, needPID bool, timeout time.Duration, ended <-chan struct{}) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		got, err := d.sizeBytes()
		if err == nil && got == wantBytes && (!needPID || d.pid() != 0) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the device: %w", context.Cause(ctx))
		case <-ended:
			return errors.New("the session ended before the device became ready")
		case <-deadline.C:
			if err != nil {
				return fmt.Errorf("device not ready after %v: %w", timeout, err)
			}
			return fmt.Errorf("device not ready after %v: size %d bytes, want %d", timeout, got, wantBytes)
		case <-tick.C:
		}
	}
}

// KernelDeviceStatus describes one /dev/nbdN as the kernel reports it.
type KernelDeviceStatus struct {
	Index int
	Path  string
	// Connected is the driver's view: the device has a configuration (it is
	// attached, being set up, or merely held open by someone).
	Connected bool
	// SizeBytes is the current capacity (0 when idle).
	SizeBytes int64
	// BackendID is the netlink backend identifier, "" when none.
	BackendID string
	// PID is the process that started the session, 0 when none.
	PID int
}

package mounter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/rafsnbd/rafsnbd/fusedev"
	"github.com/rafsnbd/rafsnbd/nbd"
)

// Options describe one mount.
type Options struct {
	// StateDir holds the records; default DefaultStateDir.
	StateDir string
	// Mountpoint is an existing directory.
	Mountpoint string
	// Transport is auto, nbd or fuse; default auto: the kernel NBD
	// driver where the module is there (or loads), else FUSE.
	Transport string
	// ForceLoop mounts EROFS on a loop device over the FUSE file even
	// where the kernel mounts the file directly.
	ForceLoop bool
	// BlockSize is the NBD device's logical block size; 0: NBD's default.
	BlockSize int64
	// BackendID tags the NBD device so that a restarted daemon finds it.
	BackendID string
	// Image, CacheDir and RootHash are recorded for status.
	Image, CacheDir, RootHash string
	// Extra, if set, adds source figures (blob cache) to the stats.
	Extra func() map[string]int64
	// Fetches, if set, counts the source's backend requests (it only
	// grows): a device read during which it grows is a cache miss.
	Fetches func() int64
	Logger  *zerolog.Logger
	// Ready is called once: with nil when the filesystem is mounted, or
	// with the error that stopped Serve before that.
	Ready func(error)
}

func (o *Options) stateDir() string {
	if o.StateDir == "" {
		return DefaultStateDir
	}
	return o.StateDir
}

func (o *Options) logger() *zerolog.Logger {
	if o.Logger == nil {
		l := zerolog.Nop()
		return &l
	}
	return o.Logger
}

// CleanMountpoint returns the absolute path of mountpoint with symlinks
// resolved: the key of its record. It must be a directory.
func CleanMountpoint(mountpoint string) (string, error) {
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return "", err
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("mountpoint %s: %w", mountpoint, err)
	}
	st, err := os.Stat(real)
	if err != nil {
		return "", fmt.Errorf("mountpoint %s: %w", mountpoint, err)
	}
	if !st.IsDir() {
		return "", fmt.Errorf("mountpoint %s: not a directory", mountpoint)
	}
	return real, nil
}

// nbdAvailable reports whether the kernel has the NBD driver, loading the
// module if it can.
func nbdAvailable() bool {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		return true
	}
	if p, err := exec.LookPath("modprobe"); err == nil {
		if exec.Command(p, "-q", "nbd").Run() == nil {
			_, err := os.Stat("/sys/module/nbd")
			return err == nil
		}
	}
	return false
}

// Serve mounts dev as an EROFS filesystem on o.Mountpoint and serves it
// until ctx is done (then it unmounts everything it set up) or the
// transport ends. It calls o.Ready once the filesystem is mounted and the
// record is written, or with the error that prevented it.
func Serve(ctx context.Context, dev Device, o Options) (err error) {
	readyCalled := false
	defer func() {
		if !readyCalled && o.Ready != nil {
			o.Ready(err)
		}
	}()
	log := o.logger()
	mnt, err := CleanMountpoint(o.Mountpoint)
	if err != nil {
		return err
	}
	stateDir := o.stateDir()
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	transport := o.Transport
	switch transport {
	case "", TransportAuto:
		transport = TransportFUSE
		if nbdAvailable() {
			transport = TransportNBD
		}
	case TransportNBD, TransportFUSE:
	default:
		return fmt.Errorf("transport %q: want auto, nbd or fuse", o.Transport)
	}
	old, err := readRecord(stateDir, mnt)
	if err == nil {
		if old.alive() {
			return fmt.Errorf("%s is already mounted by rafsnbd (daemon pid %d): run 'rafsnbd umount %s' first", mnt, old.PID, mnt)
		}
		if transport == TransportNBD && old.Transport == TransportNBD && old.Device != "" && old.BackendID == nbdBackendID(o.BackendID, mnt) {
			// The same image on the same mountpoint: anything else would
			// put other bytes under a mounted filesystem.
			if src, _, ok := mountSource(mnt); ok && src == old.Device {
				// A restarted daemon: hand the kernel's device new sockets
				// under the same mount (the reads waiting on it carry on).
				return serveNBD(ctx, dev, o, mnt, old, &readyCalled)
			}
		}
		log.Info().Str("mountpoint", mnt).Int("pid", old.PID).Msg("releasing what a dead daemon left")
		if err := release(stateDir, old, log); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if src, fstype, ok := mountSource(mnt); ok {
		return fmt.Errorf("%s is already a mount point (%s on it, type %s)", mnt, src, fstype)
	}
	if transport == TransportNBD {
		return serveNBD(ctx, dev, o, mnt, nil, &readyCalled)
	}
	return serveFUSE(ctx, dev, o, mnt, &readyCalled)
}

func serveFUSE(ctx context.Context, dev Device, o Options, mnt string, readyCalled *bool) error {
	log, stateDir := o.logger(), o.stateDir()
	p := statePaths(stateDir, mnt)
	cdev := newCounted(dev, o.Fetches)
	rec := &Record{
		Mountpoint: mnt, Transport: TransportFUSE, State: StateStarting,
		File: filepath.Join(p.fuseDir, fuseFileName), FuseDir: p.fuseDir, FuseConn: -1,
		Image: o.Image, CacheDir: o.CacheDir, RootHash: o.RootHash, Log: p.log,
		PID: os.Getpid(), PIDStart: processStart(os.Getpid()),
	}
	// Written before anything is set up, so that whatever this process
	// leaves behind if it dies is named by a record.
	if err := writeRecord(stateDir, rec); err != nil {
		return err
	}
	if err := os.Mkdir(p.fuseDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		removeState(stateDir, mnt)
		return fmt.Errorf("FUSE directory: %w", err)
	}
	srv, err := fusedev.Mount(p.fuseDir, cdev, fusedev.Options{
		Name:   fuseFileName,
		FsName: "rafsnbd",
		OnError: func(off int64, n int, err error) {
			log.Error().Err(err).Int64("offset", off).Int("length", n).Msg("device read failed: EIO")
		},
	})
	if err != nil {
		removeState(stateDir, mnt)
		return err
	}
	rec.FuseConn = srv.Connection()
	if err := writeRecord(stateDir, rec); err != nil {
		_ = srv.Unmount()
		removeState(stateDir, mnt)
		return err
	}
	stopFUSE := func() {
		if err := srv.Unmount(); err != nil {
			log.Warn().Err(err).Msg("FUSE unmount failed: aborting the connection")
			_ = fusedev.Abort(srv.Connection())
			_ = unmount(p.fuseDir, true)
		}
		os.Remove(p.fuseDir)
	}
	loopDev, err := mountErofs(srv.Path(), mnt, true, o.ForceLoop)
	if err != nil {
		stopFUSE()
		removeState(stateDir, mnt)
		return err
	}
	rec.Device = loopDev
	stopStats, err := finishMount(ctx, rec, o, cdev, p)
	if err != nil {
		_ = unmount(mnt, true)
		stopFUSE()
		removeState(stateDir, mnt)
		return err
	}
	defer stopStats()
	*readyCalled = true
	if o.Ready != nil {
		o.Ready(nil)
	}
	log.Info().Str("mountpoint", mnt).Str("file", srv.Path()).Str("loop", loopDev).Int("fuse_conn", srv.Connection()).Msg("mounted")

	ended := make(chan struct{})
	go func() { srv.Wait(); close(ended) }()
	select {
	case <-ctx.Done():
	case <-ended:
		return fmt.Errorf("the FUSE connection of %s ended (aborted or unmounted from outside)", mnt)
	}
	log.Info().Str("mountpoint", mnt).Msg("stopping")
	errUmount := unmount(mnt, true)
	if loopDev != "" {
		_ = detachLoop(loopDev, srv.Path())
	}
	stopFUSE()
	if errUmount != nil {
		return errUmount
	}
	return removeState(stateDir, mnt)
}

// finishMount starts the stats socket and writes the record.
func finishMount(ctx context.Context, rec *Record, o Options, cdev *counted, p paths) (func(), error) {
	rec.PID = os.Getpid()
	rec.PIDStart = processStart(rec.PID)
	rec.State = StateMounted
	rec.Socket = p.socket
	stop, err := serveStats(ctx, p.socket, func() Stats {
		s := cdev.stats()
		if o.Extra != nil {
			s.Extra = o.Extra()
		}
		return s
	})
	if err != nil {
		return nil, fmt.Errorf("stats socket: %w", err)
	}
	if err := writeRecord(o.stateDir(), rec); err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}

// serveNBD attaches dev to the kernel's NBD driver and mounts it, or, with
// old, hands the device of a dead daemon new sockets under its mount.
func serveNBD(ctx context.Context, dev Device, o Options, mnt string, old *Record, readyCalled *bool) error {
	log, stateDir := o.logger(), o.stateDir()
	p := statePaths(stateDir, mnt)
	cdev := newCounted(dev, o.Fetches)
	backendID := nbdBackendID(o.BackendID, mnt)
	rec := &Record{Mountpoint: mnt, Transport: TransportNBD, State: StateStarting, BackendID: backendID,
		Image: o.Image, CacheDir: o.CacheDir, RootHash: o.RootHash, Log: p.log,
		PID: os.Getpid(), PIDStart: processStart(os.Getpid())}
	index := nbd.AnyDevice
	if old != nil {
		// Only the dead daemon's device: never another one that happens
		// to carry the same identifier.
		rec.Device = old.Device
		var err error
		if index, err = nbd.ParseDevice(old.Device); err != nil {
			return err
		}
	}
	// Written before the device is attached, so that whatever this
	// process leaves behind if it dies is named by a record.
	if err := writeRecord(stateDir, rec); err != nil {
		return err
	}
	att, err := nbd.AttachKernel(ctx, cdev, nbd.KernelOptions{
		Index:           index,
		BlockSize:       o.BlockSize,
		DeadConnTimeout: NBDDeadConnTimeout,
		BackendID:       backendID,
		Transmission:    nbd.TransmissionOptions{Logger: log},
		Logger:          log,
	})
	if err != nil {
		if old == nil {
			removeState(stateDir, mnt)
		}
		return err
	}
	detach := func() {
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := att.Detach(dctx); err != nil {
			log.Warn().Err(err).Str("device", att.Path).Msg("detach failed")
		}
	}
	if old != nil && !att.Reattached {
		// A new device: the dead daemon's one was gone.
		detach()
		return fmt.Errorf("%s: the dead daemon's device %s was not found again: run 'rafsnbd umount %s', then mount again", mnt, old.Device, mnt)
	}
	rec.Device = att.Path
	if err := writeRecord(stateDir, rec); err != nil {
		detach()
		return err
	}
	if old == nil {
		if _, err := mountErofs(att.Path, mnt, false, false); err != nil {
			detach()
			removeState(stateDir, mnt)
			return err
		}
	}
	stopStats, err := finishMount(ctx, rec, o, cdev, p)
	if err != nil {
		_ = unmount(mnt, true)
		detach()
		removeState(stateDir, mnt)
		return err
	}
	defer stopStats()
	*readyCalled = true
	if o.Ready != nil {
		o.Ready(nil)
	}
	log.Info().Str("mountpoint", mnt).Str("device", att.Path).Bool("reattached", att.Reattached).Msg("mounted")
	select {
	case <-ctx.Done():
	case <-att.Done():
		// Disconnected from outside: the filesystem can only fail now.
		_ = unmount(mnt, true)
		_ = removeState(stateDir, mnt)
		return fmt.Errorf("%s: the kernel ended the NBD session of %s: %v", mnt, att.Path, att.Err())
	}
	errUmount := unmount(mnt, true)
	detach()
	if errUmount != nil {
		return errUmount
	}
	return removeState(stateDir, mnt)
}

// release undoes what the record's (dead) daemon set up: the filesystem
// (lazily if busy), the loop device, the FUSE connection and mount, the
// NBD device, then the record.
func release(stateDir string, r *Record, log *zerolog.Logger) error {
	var errs []error
	if src, _, ok := mountSource(r.Mountpoint); ok && ownedSource(r, src) {
		if err := unmount(r.Mountpoint, true); err != nil {
			errs = append(errs, err)
		}
	}
	if r.Device != "" && strings.HasPrefix(r.Device, "/dev/loop") {
		if err := detachLoop(r.Device, r.File); err != nil {
			errs = append(errs, err)
		}
	}
	if r.FuseDir != "" {
		if fusedev.ConnectionExists(r.FuseConn) {
			if src, _, ok := mountSource(r.FuseDir); ok && strings.HasPrefix(src, "rafsnbd") {
				_ = fusedev.Abort(r.FuseConn)
			}
		}
		if err := unmount(r.FuseDir, true); err != nil {
			errs = append(errs, err)
		}
	}
	if r.Transport == TransportNBD && r.Device != "" && nbdDeviceIs(r.Device, r.BackendID) {
		if idx, err := nbd.ParseDevice(r.Device); err == nil && idx != nbd.AnyDevice {
			if err := nbd.DisconnectKernel(idx); err != nil {
				log.Warn().Err(err).Str("device", r.Device).Msg("NBD disconnect")
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return removeState(stateDir, r.Mountpoint)
}

// NBDDeadConnTimeout is how long reads of an NBD mount wait for a new
// daemon ('rafsnbd mount' again) once the daemon died, before they fail
// with EIO.
const NBDDeadConnTimeout = 60 * time.Second

// nbdBackendID tags a mount's NBD device with its image and mountpoint, so
// that a restarted daemon finds its own device, and never the device of
// the same image mounted elsewhere.
func nbdBackendID(image, mnt string) string {
	s := "rafsnbd:mount:" + id(mnt) + ":" + image
	if len(s) > 512 {
		sum := sha256.Sum256([]byte(image))
		s = "rafsnbd:mount:" + id(mnt) + ":sha256:" + hex.EncodeToString(sum[:])
	}
	return s
}

// nbdDeviceIs reports whether the NBD device dev still carries backendID
// (or is attached at all, for a record without one), so that release
// never disconnects a device that someone else attached since.
func nbdDeviceIs(dev, backendID string) bool {
	list, err := nbd.KernelStatus()
	if err != nil {
		return false
	}
	for _, d := range list {
		if d.Path == dev {
			return d.Connected && (backendID == "" || d.BackendID == backendID)
		}
	}
	return false
}

// ownedSource reports whether a mount's source is the one the record set
// up (so that release never unmounts someone else's filesystem).
func ownedSource(r *Record, src string) bool {
	return src != "" && (src == r.Device || src == r.File)
}

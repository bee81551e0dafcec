package mounter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// ReadyEnv names the environment variable that tells a daemon started by
// Spawn which file descriptor to report readiness on.
const ReadyEnv = "RAFSNBD_READY_FD"

const readyMessage = "ready\n"

// Spawn starts the daemon for mountpoint in the background (this
// program, with args, in its own session, logging to the mount's log
// file) and waits until it reports that the filesystem is mounted, or
// fails, or dies. The daemon must call Notifier's function.
func Spawn(ctx context.Context, args []string, stateDir, mountpoint string) error {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	mnt, err := CleanMountpoint(mountpoint)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logPath := LogPath(stateDir, mnt)
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("daemon log: %w", err)
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	cmd := exec.Command(exe, args...)
	cmd.ExtraFiles = []*os.File{w} // fd 3
	cmd.Env = append(os.Environ(), ReadyEnv+"=3")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own session: a terminal's ^C or hangup does not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start the daemon: %w", err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	msg := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(r, 64<<10))
		msg <- string(b)
	}()
	select {
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		return ctx.Err()
	case m := <-msg:
		if m == readyMessage {
			return nil // the daemon carries on; nobody waits for it
		}
		if m != "" {
			return errors.New(strings.TrimSpace(m))
		}
		// Died without a word: its log says why.
		werr := <-exited
		tail, _ := os.ReadFile(logPath)
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return fmt.Errorf("the daemon exited before mounting (%v): %s", werr, strings.TrimSpace(string(tail)))
	}
}

// Notifier returns the function a daemon started by Spawn calls once, with
// nil when mounted or with the error that stopped it, or nil when this
// process was not started by Spawn.
func Notifier() func(error) {
	v := os.Getenv(ReadyEnv)
	if v == "" {
		return nil
	}
	os.Unsetenv(ReadyEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil
	}
	f := os.NewFile(uintptr(fd), "ready")
	if f == nil {
		return nil
	}
	done := false
	return func(err error) {
		if done {
			return
		}
		done = true
		if err == nil {
			_, _ = f.WriteString(readyMessage)
		} else {
			_, _ = f.WriteString(err.Error())
		}
		f.Close()
	}
}

// Unmount undoes the mount on mountpoint: unmounts the filesystem, stops
// the daemon (which detaches its device and FUSE connection), and
// releases whatever a dead daemon left behind. A busy filesystem is an
// error while its daemon lives; after a crash it is detached lazily.
func Unmount(ctx context.Context, stateDir, mountpoint string, log *zerolog.Logger) error {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	if log == nil {
		l := zerolog.Nop()
		log = &l
	}
	mnt, err := CleanMountpoint(mountpoint)
	if err != nil {
		return err
	}
	r, err := readRecord(stateDir, mnt)
	if errors.Is(err, os.ErrNotExist) {
		if src, fstype, ok := mountSource(mnt); ok {
			return fmt.Errorf("%s: not mounted by rafsnbd (%s, type %s, is mounted there; no record in %s)", mnt, src, fstype, stateDir)
		}
		return fmt.Errorf("%s: not mounted by rafsnbd (no record in %s)", mnt, stateDir)
	}
	if err != nil {
		return err
	}
	if !r.alive() {
		log.Info().Str("mountpoint", mnt).Int("pid", r.PID).Msg("the daemon is gone: releasing what it left")
		return release(stateDir, r, log)
	}
	if src, _, ok := mountSource(mnt); ok && ownedSource(r, src) {
		if err := unmount(mnt, false); err != nil {
			return err
		}
	}
	// The daemon finds the filesystem gone, detaches and exits.
	if err := stopDaemon(ctx, r); err != nil {
		return err
	}
	// Whatever it could not undo (or a daemon that had to be killed).
	return release(stateDir, r, log)
}

// stopDaemon sends SIGTERM and waits for the daemon to exit, killing it
// after 30 s.
func stopDaemon(ctx context.Context, r *Record) error {
	p, err := os.FindProcess(r.PID)
	if err != nil {
		return nil
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return nil // gone
	}
	deadline := time.Now().Add(30 * time.Second)
	for r.alive() {
		if time.Now().After(deadline) {
			_ = p.Signal(syscall.SIGKILL)
			deadline = time.Now().Add(5 * time.Second)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// Status is one mount as List reports it.
type Status struct {
	Record
	// Alive: the daemon runs. Mounted: the filesystem is on the
	// mountpoint.
	Alive   bool `json:"alive"`
	Mounted bool `json:"mounted"`
	// Released: the daemon was dead and List released what it left.
	Released bool   `json:"released,omitempty"`
	Stats    *Stats `json:"stats,omitempty"`
	Problem  string `json:"problem,omitempty"`
}

// List reports every mount in stateDir. Mounts of dead FUSE daemons (whose
// filesystems only return errors) are released on the way; a dead NBD
// daemon's mount is left for a restart ('rafsnbd mount' again) or
// Unmount, since its device waits for new sockets.
func List(ctx context.Context, stateDir string, log *zerolog.Logger) ([]Status, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	if log == nil {
		l := zerolog.Nop()
		log = &l
	}
	recs, err := records(stateDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var out []Status
	for _, r := range recs {
		s := Status{Record: *r, Alive: r.alive()}
		src, _, ok := mountSource(r.Mountpoint)
		s.Mounted = ok && ownedSource(r, src)
		switch {
		case s.Alive && r.State == StateMounted:
			st, err := queryStats(ctx, r.Socket)
			if err != nil {
				s.Problem = err.Error()
			}
			s.Stats = st
		case s.Alive:
			// Starting: nothing to ask yet.
		case r.Transport == TransportNBD:
			s.Problem = "daemon dead: reads wait for a new server ('rafsnbd mount' again) until the device's dead-connection timeout"
		default:
			if err := release(stateDir, r, log); err != nil {
				s.Problem = "daemon dead; releasing failed: " + err.Error()
			} else {
				s.Released, s.Mounted = true, false
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// Keys of Stats.Extra that String shows: blob cache figures.
const (
	ExtraFetchedBytes  = "fetched_bytes"  // bytes received from the blobs' backend
	ExtraFetchRequests = "fetch_requests" // backend requests
	ExtraCachedBytes   = "cached_bytes"   // uncompressed bytes of cached chunks
	ExtraCachedUnits   = "cached_chunks"  // chunks (cache units) cached
	ExtraUnits         = "chunks"         // chunks of all blobs
)

// statsString is a one-line summary of a Stats, for tables.
func (s *Stats) String() string {
	if s == nil {
		return "-"
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%d reads, %d bytes, %d errors, p50 %dµs, p99 %dµs", s.Reads, s.BytesRead, s.ReadErrors, s.P50Micros, s.P99Micros)
	if v, ok := s.Extra[ExtraFetchedBytes]; ok {
		fmt.Fprintf(&b, ", fetched %d bytes in %d requests", v, s.Extra[ExtraFetchRequests])
	}
	if v, ok := s.Extra[ExtraCachedBytes]; ok {
		fmt.Fprintf(&b, ", cached %d bytes (%d of %d chunks)", v, s.Extra[ExtraCachedUnits], s.Extra[ExtraUnits])
	}
	if n := s.CacheHits + s.CacheMisses; n > 0 {
		fmt.Fprintf(&b, ", hit rate %.1f%%", 100*float64(s.CacheHits)/float64(n))
	}
	return b.String()
}

// Package mounter mounts a rafsnbd device as an EROFS filesystem with one
// call, and undoes it with another, on any Linux host: through the kernel
// NBD driver where it exists, else through a FUSE file that EROFS mounts
// directly (file-backed, kernel 6.12+) or through a loop device.
//
// A mount is served by a daemon process (Serve), which the command line
// starts in the background and waits for (Spawn, Ready). Each mount has a
// state record, a JSON file under the state directory (/run/rafsnbd), that
// Unmount and List read. Unmount and a new Serve on the same mountpoint
// also clean up after a daemon that died (kill -9): they unmount the
// filesystem, abort the dead FUSE connection, release the loop or NBD
// device and remove the record.
package mounter

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// DefaultStateDir holds the state records.
const DefaultStateDir = "/run/rafsnbd"

// Transports.
const (
	TransportAuto = "auto"
	TransportNBD  = "nbd"
	TransportFUSE = "fuse"
)

// Record states.
const (
	StateStarting = "starting"
	StateMounted  = "mounted"
)

// fuseFileName is the FUSE file's name in its directory.
const fuseFileName = "disk"

// Record is the state of one mount, as the daemon wrote it once the
// filesystem was mounted.
type Record struct {
	Mountpoint string `json:"mountpoint"`
	Transport  string `json:"transport"`
	// State is StateStarting until the filesystem is mounted.
	State string `json:"state"`
	// Device is the block device EROFS is mounted on (/dev/nbdN,
	// /dev/loopN), empty for a file-backed mount.
	Device string `json:"device,omitempty"`
	// File is the FUSE file (the mount's source when file-backed).
	File string `json:"file,omitempty"`
	// FuseDir is the FUSE mount; FuseConn its number under
	// /sys/fs/fuse/connections.
	FuseDir  string `json:"fuse_dir,omitempty"`
	FuseConn int    `json:"fuse_conn,omitempty"`
	PID      int    `json:"pid"`
	// PIDStart is the daemon's start time (/proc/PID/stat field 22), so
	// that a reused pid is never taken for the daemon.
	PIDStart  uint64 `json:"pid_start"`
	Image     string `json:"image"`
	CacheDir  string `json:"cache_dir,omitempty"`
	RootHash  string `json:"root_hash,omitempty"`
	Socket    string `json:"socket,omitempty"`
	Log       string `json:"log,omitempty"`
	BackendID string `json:"backend_id,omitempty"`
}

// id names a mountpoint's files in the state directory.
func id(mountpoint string) string {
	sum := sha256.Sum256([]byte(mountpoint))
	return hex.EncodeToString(sum[:8])
}

// paths are the state files of one mountpoint.
type paths struct{ record, socket, log, fuseDir string }

func statePaths(stateDir, mountpoint string) paths {
	base := filepath.Join(stateDir, id(mountpoint))
	return paths{record: base + ".json", socket: base + ".sock", log: base + ".log", fuseDir: base + ".fuse"}
}

// LogPath is where the daemon of mountpoint logs.
func LogPath(stateDir, mountpoint string) string { return statePaths(stateDir, mountpoint).log }

func writeRecord(stateDir string, r *Record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(statePaths(stateDir, r.Mountpoint).record, append(b, '\n'), 0o644)
}

// readRecord reads the record of mountpoint; os.ErrNotExist when none.
func readRecord(stateDir, mountpoint string) (*Record, error) {
	return readRecordFile(statePaths(stateDir, mountpoint).record)
}

func readRecordFile(path string) (*Record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("state record %s: %w", path, err)
	}
	if r.Mountpoint == "" {
		return nil, fmt.Errorf("state record %s: no mountpoint", path)
	}
	return &r, nil
}

// records lists every record in stateDir.
func records(stateDir string) ([]*Record, error) {
	files, err := filepath.Glob(filepath.Join(stateDir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*Record
	for _, f := range files {
		if atomicfile.IsTemp(filepath.Base(f)) {
			continue
		}
		r, err := readRecordFile(f)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // removed meanwhile
			}
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func removeState(stateDir, mountpoint string) error {
	p := statePaths(stateDir, mountpoint)
	var errs []error
	for _, f := range []string{p.socket, p.record} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(p.fuseDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	// The log stays for a post-mortem; the next mount truncates it.
	return errors.Join(errs...)
}

// processStart is a process's start time in clock ticks since boot, 0 when
// there is no such process.
func processStart(pid int) uint64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// from the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); start time is field 22.
	if len(fields) < 20 || fields[0] == "Z" {
		return 0
	}
	v, _ := strconv.ParseUint(fields[19], 10, 64)
	return v
}

// alive reports whether the record's daemon still runs.
func (r *Record) alive() bool {
	return r.PID > 0 && r.PIDStart != 0 && processStart(r.PID) == r.PIDStart
}

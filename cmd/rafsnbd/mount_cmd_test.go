package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testtree"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// mountEnv is one image built from testtree, mounted through the binary.
type mountEnv struct {
	bin, work, state, mnt string
	src                   string
	want                  map[string]*treecmp.Entry
	probe                 []byte // content of src/verity-probe
}

func newMountEnv(t *testing.T) *mountEnv {
	t.Helper()
	testutil.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "no /dev/fuse: %v", err)
	}
	e := &mountEnv{bin: buildBinary(t), work: t.TempDir()}
	e.state = filepath.Join(e.work, "state")
	e.mnt = filepath.Join(e.work, "mnt")
	e.src = filepath.Join(e.work, "src")
	for _, d := range []string{e.mnt, e.src} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	testtree.Make(t, e.src)
	// A file whose bytes are found again in the exported disk.
	e.probe = make([]byte, 64<<10)
	rand.New(rand.NewSource(13)).Read(e.probe)
	if err := os.WriteFile(filepath.Join(e.src, "verity-probe"), e.probe, 0o644); err != nil {
		t.Fatal(err)
	}
	var err error
	if e.want, err = treecmp.Scan(e.src, treecmp.Options{SkipRoot: true}); err != nil {
		t.Fatal(err)
	}
	run(t, e.bin, "create", "-B", filepath.Join(e.work, "img.boot"), "-D", filepath.Join(e.work, "blobs"), e.src)
	t.Cleanup(func() {
		// Whatever a failed test left mounted.
		_ = exec.Command(e.bin, "umount", "--state-dir", e.state, e.mnt).Run()
	})
	return e
}

func (e *mountEnv) mount(t *testing.T, args ...string) *mountRecord {
	t.Helper()
	start := time.Now()
	run(t, e.bin, append(append([]string{"mount", "--state-dir", e.state}, args...), e.mnt)...)
	t.Logf("mount %s: %v", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
	return e.status(t)
}

type mountRecord struct {
	Mountpoint, Transport, Device, File, FuseDir, State, RootHash string
	FuseConn                                                      int `json:"fuse_conn"`
	PID                                                           int
	Alive, Mounted                                                bool
	Stats                                                         *struct {
		BytesRead uint64 `json:"bytes_read"`
	}
}

func (e *mountEnv) status(t *testing.T) *mountRecord {
	t.Helper()
	var list []struct {
		mountRecord
		FuseDir  string `json:"fuse_dir"`
		RootHash string `json:"root_hash"`
	}
	out := run(t, e.bin, "status", "--json", "--state-dir", e.state)
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if len(list) != 1 {
		t.Fatalf("status lists %d mounts, want 1:\n%s", len(list), out)
	}
	r := list[0].mountRecord
	r.FuseDir, r.RootHash = list[0].FuseDir, list[0].RootHash
	if r.Mountpoint != e.mnt || r.Transport != "fuse" || !r.Alive || !r.Mounted || r.State != "mounted" {
		t.Fatalf("status: %s", out)
	}
	return &r
}

// requireGone checks that nothing of the mount r is left: no mount, loop
// device, FUSE connection, process or record.
func (e *mountEnv) requireGone(t *testing.T, r *mountRecord) {
	t.Helper()
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, p := range []string{e.mnt, e.state} {
		if bytes.Contains(mounts, []byte(" "+p)) {
			t.Errorf("%s is still in /proc/self/mountinfo", p)
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, l := range loops {
		if b, _ := os.ReadFile(l); bytes.HasPrefix(b, []byte(e.state)) {
			t.Errorf("loop device still bound: %s = %s", l, b)
		}
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/fuse/connections", strconv.Itoa(r.FuseConn))); err == nil {
		t.Errorf("FUSE connection %d still listed", r.FuseConn)
	}
	if processRuns(r.PID) {
		t.Errorf("daemon %d still runs", r.PID)
	}
	if recs, _ := filepath.Glob(filepath.Join(e.state, "*.json")); len(recs) > 0 {
		t.Errorf("records left: %v", recs)
	}
}

func (e *mountEnv) umount(t *testing.T, r *mountRecord) {
	t.Helper()
	run(t, e.bin, "umount", "--state-dir", e.state, e.mnt)
	e.requireGone(t, r)
}

func TestMountFUSEFileBackedAndLoop(t *testing.T) {
	e := newMountEnv(t)
	for _, c := range []struct {
		name string
		args []string
	}{
		{"file-backed", nil},
		{"loop", []string{"--loop"}},
		{"verity-built", []string{"--verity"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"-B", filepath.Join(e.work, "img.boot"), "-D", filepath.Join(e.work, "blobs")}, c.args...)
			r := e.mount(t, args...)
			switch {
			case c.name == "loop" && !strings.HasPrefix(r.Device, "/dev/loop"):
				t.Errorf("--loop: mounted on %q, not a loop device", r.Device)
			case c.name != "loop" && r.Device != "":
				t.Errorf("file-backed mount went through %s", r.Device)
			case c.name == "verity-built" && len(r.RootHash) != 64:
				t.Errorf("--verity: root hash %q in the record", r.RootHash)
			}
			requireTree(t, e.want, e.mnt, c.name)
			if st := e.status(t); st.Stats == nil || st.Stats.BytesRead == 0 {
				t.Errorf("status shows no bytes read")
			}
			e.umount(t, r)
		})
	}
}

func TestMountSurvivesKilledDaemon(t *testing.T) {
	e := newMountEnv(t)
	args := []string{"-B", filepath.Join(e.work, "img.boot"), "-D", filepath.Join(e.work, "blobs")}
	r := e.mount(t, args...)
	if err := syscall.Kill(r.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100 && processRuns(r.PID); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	// Reads fail, and do not hang: the kernel aborted the connection.
	done := make(chan error, 1)
	go func() {
		_, err := os.ReadFile(filepath.Join(e.mnt, "verity-probe"))
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("read through a dead daemon's mount succeeded")
		}
		t.Logf("read after kill -9: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("read through a dead daemon's mount hangs")
	}
	e.umount(t, r)

	// Mount again; then kill again and let the next mount clean up.
	r = e.mount(t, args...)
	requireTree(t, e.want, e.mnt, "mount after kill -9 and umount")
	if err := syscall.Kill(r.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100 && processRuns(r.PID); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	r2 := e.mount(t, args...)
	requireTree(t, e.want, e.mnt, "mount over a dead daemon's mount")
	if _, err := os.Stat(filepath.Join("/sys/fs/fuse/connections", strconv.Itoa(r.FuseConn))); err == nil && r.FuseConn != r2.FuseConn {
		t.Errorf("the dead daemon's FUSE connection %d is still listed", r.FuseConn)
	}
	e.umount(t, r2)
}

func TestMountVerityDiskFlippedByte(t *testing.T) {
	e := newMountEnv(t)
	disk := filepath.Join(e.work, "img.disk")
	out := run(t, e.bin, "export", "-B", filepath.Join(e.work, "img.boot"), "-D", filepath.Join(e.work, "blobs"), "-o", disk, "--verity")
	root := parseVerityLine(t, strings.TrimSpace(out[strings.Index(out, "dm-verity options:"):])).root

	r := e.mount(t, "--disk", disk, "--verity", "--root-hash", root)
	if r.RootHash != root {
		t.Errorf("record root hash %s, want %s", r.RootHash, root)
	}
	requireTree(t, e.want, e.mnt, "verity disk")
	e.umount(t, r)

	b, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	at := bytes.Index(b, e.probe[:4096])
	if at < 0 {
		t.Fatal("probe file bytes not found in the disk")
	}
	flipByte(t, disk, int64(at)+5000)

	// Without --verity the flipped byte is served: the check is what
	// turns it into EIO.
	r = e.mount(t, "--disk", disk)
	if got, err := os.ReadFile(filepath.Join(e.mnt, "verity-probe")); err != nil || bytes.Equal(got, e.probe) {
		t.Fatalf("without --verity: err %v, equal %v; want the flipped byte served", err, bytes.Equal(got, e.probe))
	}
	e.umount(t, r)

	r = e.mount(t, "--disk", disk, "--verity", "--root-hash", root)
	if _, err := os.ReadFile(filepath.Join(e.mnt, "verity-probe")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading the file with a flipped byte: %v, want EIO", err)
	}
	// Every other file reads correctly.
	checked := 0
	for p, en := range e.want {
		if en.Type != "reg" || p == "verity-probe" {
			continue
		}
		want, err := os.ReadFile(filepath.Join(e.src, p))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(e.mnt, p))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s beside the flipped file: err %v, equal %v", p, err, bytes.Equal(got, want))
		}
		checked++
	}
	t.Logf("%d other files read correctly", checked)
	e.umount(t, r)
}

// processRuns reports whether pid is a process that has not exited: a
// zombie (the daemon is reparented to init, which may reap it late) does
// not count.
func processRuns(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && !strings.HasPrefix(strings.TrimSpace(s[i+1:]), "Z")
}

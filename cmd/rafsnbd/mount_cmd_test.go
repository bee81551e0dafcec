package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testtree"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// mountBin is the binary the mount tests share (each go build costs
// seconds on a loaded machine); TestMain removes it.
var mountBin struct {
	once      sync.Once
	dir, path string
	err       error
	out       []byte
}

func mountBinary(t *testing.T) string {
	t.Helper()
	mountBin.once.Do(func() {
		if mountBin.dir, mountBin.err = os.MkdirTemp("", "rafsnbd-mount-test-"); mountBin.err != nil {
			return
		}
		mountBin.path = filepath.Join(mountBin.dir, "rafsnbd")
		mountBin.out, mountBin.err = exec.Command("go", "build", "-o", mountBin.path, ".").CombinedOutput()
	})
	if mountBin.err != nil {
		t.Fatalf("go build: %v\n%s", mountBin.err, mountBin.out)
	}
	return mountBin.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if mountBin.dir != "" {
		os.RemoveAll(mountBin.dir)
	}
	os.Exit(code)
}

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
	e := &mountEnv{bin: mountBinary(t), work: t.TempDir()}
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

// A converted --image: an OCI layout (testtree's tree as a layer, random
// layers above it) converted into --cache-dir, mounted by reference; the
// tree equals the layers extracted by tar one over the other.
func TestMountConvertedImage(t *testing.T) {
	e := newMountEnv(t)
	var tree bytes.Buffer
	testtree.WriteTar(t, e.src, &tree)
	base, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(tree.Bytes())), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, base)
	if err == nil {
		var top v1.Image
		if top, err = random.Image(64<<10, 2); err == nil {
			var layers []v1.Layer
			if layers, err = top.Layers(); err == nil {
				img, err = mutate.AppendLayers(img, layers...)
			}
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(e.work, "layout")
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(e.work, "cache")
	ref := "oci:" + dir + ":v1"
	run(t, e.bin, "-q", "convert", ref, "--cache-dir", cache)
	src := filepath.Join(e.work, "extracted")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// The layers in order: they hold no whiteouts, so extracting one over
	// the other is the image's filesystem.
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tar := exec.Command("tar", "-C", src, "-xpf", "-", "--numeric-owner", "--xattrs", "--xattrs-include=*")
		tar.Stdin = rc
		out, err := tar.CombinedOutput()
		rc.Close()
		if err != nil {
			t.Fatalf("tar -x of layer %d: %v\n%s", i, err, out)
		}
	}
	want := scanNoDirMtime(t, src)

	r := e.mount(t, "--image", ref, "--cache-dir", cache)
	got := scanNoDirMtime(t, e.mnt)
	if diffs := treecmp.Diff(want, got, treecmp.Options{}); len(diffs) > 0 {
		t.Fatalf("mount --image differs from the image's filesystem in %d ways:\n%s", len(diffs), treecmp.Summary(diffs, 30))
	}
	t.Logf("mount --image: %d entries equal the image's filesystem", len(got))
	e.umount(t, r)
}

// A lazily served image: -B with its blob in a registry on 127.0.0.1,
// fetched into --cache-dir as it is read. The tree equals the source,
// status shows what was fetched and cached, and umount leaves nothing.
func TestMountRegistryLazy(t *testing.T) {
	e := newMountEnv(t)
	addr := testregistry.Start(t)
	ents, err := os.ReadDir(filepath.Join(e.work, "blobs"))
	if err != nil || len(ents) != 1 {
		t.Fatalf("want one blob: %v %v", ents, err)
	}
	blob, err := os.ReadFile(filepath.Join(e.work, "blobs", ents[0].Name()))
	if err != nil {
		t.Fatal(err)
	}
	testregistry.PushBlob(t, addr, "mount/lazy", ents[0].Name(), blob)

	r := e.mount(t, "-B", filepath.Join(e.work, "img.boot"), "--registry", addr+"/mount/lazy", "--insecure",
		"--cache-dir", filepath.Join(e.work, "cache"))
	requireTree(t, e.want, e.mnt, "lazy registry image")
	var list []struct {
		Stats struct {
			CacheHits   uint64           `json:"cache_hits"`
			CacheMisses uint64           `json:"cache_misses"`
			Extra       map[string]int64 `json:"extra"`
		} `json:"stats"`
	}
	out := run(t, e.bin, "status", "--json", "--state-dir", e.state)
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	st := list[0].Stats
	if st.Extra["fetched_bytes"] <= 0 || st.Extra["fetched_bytes"] > int64(len(blob)) || st.Extra["cached_bytes"] <= 0 ||
		st.Extra["cached_chunks"] <= 0 || st.Extra["chunks"] < st.Extra["cached_chunks"] || st.CacheMisses == 0 || st.CacheHits == 0 {
		t.Errorf("status: blob cache figures missing or wrong for a %d-byte blob read whole: %s", len(blob), out)
	}
	text := run(t, e.bin, "status", "--state-dir", e.state)
	if !strings.Contains(text, "fetched ") || !strings.Contains(text, "hit rate ") {
		t.Errorf("status does not show the blob cache:\n%s", text)
	}
	t.Logf("status:\n%s", text)
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

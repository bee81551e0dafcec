package build

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testtree"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// The kernel is the judge: every image built here is laid out flat,
// mounted as EROFS, and compared with its source, path by path.

var (
	srcOnce  sync.Once
	srcDir   string
	srcCount int
	srcErr   string
)

// sourceTree returns the shared test tree, made once per test binary.
func sourceTree(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)
	srcOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rafs-build-src-")
		if err != nil {
			srcErr = err.Error()
			return
		}
		srcDir = filepath.Join(dir, "src")
		if err := os.Mkdir(srcDir, 0o755); err != nil {
			srcErr = err.Error()
			return
		}
		// testtree.Make reports through t; a failure here fails this test
		// and leaves srcDir unusable for the others.
		srcErr = "test tree creation failed in an earlier test"
		srcCount = testtree.Make(t, srcDir)
		srcErr = ""
	})
	if srcErr != "" {
		t.Fatal(srcErr)
	}
	return srcDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if srcDir != "" {
		os.RemoveAll(filepath.Dir(srcDir))
	}
	cleanupBenchData()
	os.Exit(code)
}

func buildDir(t *testing.T, src string, opts Options) (boot string, res *Result) {
	t.Helper()
	boot = filepath.Join(t.TempDir(), "image.boot")
	var buf bytes.Buffer
	res, err := FromDir(context.Background(), src, &buf, opts)
	if err != nil {
		t.Fatalf("FromDir: %v", err)
	}
	if err := os.WriteFile(boot, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return boot, res
}

func buildTarFile(t *testing.T, tarPath string, opts Options) (boot string, res *Result) {
	t.Helper()
	f, err := os.Open(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	boot = filepath.Join(t.TempDir(), "image.boot")
	var buf bytes.Buffer
	res, err = FromTar(context.Background(), f, &buf, opts)
	if err != nil {
		t.Fatalf("FromTar: %v", err)
	}
	if err := os.WriteFile(boot, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return boot, res
}

func TestKernelDirBuild(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "mount", "umount")
	src := sourceTree(t)
	want := snapshot(t, src, nil)
	if len(want) < 2500 {
		t.Fatalf("test tree has only %d paths", len(want))
	}
	cases := []struct {
		name string
		opts func(*Options)
	}{
		{"zstd", func(o *Options) {}},
		{"lz4_block", func(o *Options) { o.Compressor = rafs.CompressLZ4Block }},
		{"gzip", func(o *Options) { o.Compressor = rafs.CompressGzip }},
		{"none", func(o *Options) { o.Compressor = rafs.CompressNone }},
		{"sha256-64k-chunks", func(o *Options) { o.Digester = rafs.DigestSHA256; o.ChunkSize = 64 << 10 }},
		{"16m-chunks", func(o *Options) { o.ChunkSize = 16 << 20 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			opts := DefaultOptions(t.TempDir())
			c.opts(&opts)
			boot, res := buildDir(t, src, opts)
			if len(res.Blobs) != 1 {
				t.Fatalf("%d blobs, want 1", len(res.Blobs))
			}
			t.Logf("bootstrap %d bytes, %d inodes; blob %s: %d bytes, %d chunks, %d uncompressed",
				res.Bootstrap.Size, res.Bootstrap.Inodes, res.Blobs[0].ID, res.Blobs[0].Size,
				res.Blobs[0].Chunks, res.Blobs[0].UncompressedSize)
			checkBlobNamedBySHA256(t, res.Blobs[0].Path)
			mnt := testutil.MountErofs(t, flatImage(t, boot, opts.BlobDir), "loop")
			compareTrees(t, want, snapshot(t, mnt, nil))
		})
	}
}

func TestKernelTarfs(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "mount", "umount", "losetup")
	src := sourceTree(t)
	noSockets := func(_ string, st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFSOCK }
	want := snapshot(t, src, noSockets)
	tarPath := filepath.Join(t.TempDir(), "layer.tar")
	tf, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	testtree.WriteTar(t, src, tf)
	if err := tf.Close(); err != nil {
		t.Fatal(err)
	}

	opts := DefaultOptions(t.TempDir())
	boot, res := buildTarFile(t, tarPath, opts)
	blob := res.Blobs[0]
	t.Logf("bootstrap %d bytes, %d inodes; tar blob %s (%s): %d bytes, %d chunks",
		res.Bootstrap.Size, res.Bootstrap.Inodes, blob.ID, blob.Placed, blob.Size, blob.Chunks)
	checkBlobNamedBySHA256(t, blob.Path)
	if got, want := testutil.FileSHA256(t, blob.Path), testutil.FileSHA256(t, tarPath); got != want {
		t.Fatalf("blob %s is not the tar", blob.Path)
	}

	t.Run("flat", func(t *testing.T) {
		mnt := testutil.MountErofs(t, flatImage(t, boot, opts.BlobDir), "loop")
		compareTrees(t, want, snapshot(t, mnt, nil))
	})
	t.Run("device-option", func(t *testing.T) {
		// How nydus-snapshotter mounts tarfs on a host: the bootstrap
		// with the layer tar as an extra device.
		dev := testutil.Losetup(t, blob.Path)
		mnt := testutil.MountErofs(t, boot, "loop", "device="+dev)
		compareTrees(t, want, snapshot(t, mnt, nil))
	})
}

func checkBlobNamedBySHA256(t *testing.T, path string) {
	t.Helper()
	if got := testutil.FileSHA256(t, path); got != filepath.Base(path) {
		t.Errorf("blob %s has sha256 %s", path, got)
	}
}

func TestReproducible(t *testing.T) {
	src := sourceTree(t)
	var boots [][]byte
	var ids []string
	for _, workers := range []int{1, 3} {
		opts := DefaultOptions(t.TempDir())
		opts.Workers = workers
		boot, res := buildDir(t, src, opts)
		b, err := os.ReadFile(boot)
		if err != nil {
			t.Fatal(err)
		}
		boots = append(boots, b)
		ids = append(ids, res.Blobs[0].ID)
	}
	if !bytes.Equal(boots[0], boots[1]) || ids[0] != ids[1] {
		t.Errorf("two builds of one tree differ: blob %s vs %s, bootstraps equal: %v", ids[0], ids[1], bytes.Equal(boots[0], boots[1]))
	}

	var tars [2]bytes.Buffer
	for i := range tars {
		testtree.WriteTar(t, src, &tars[i])
	}
	var tboots [2]bytes.Buffer
	for i := range tars {
		opts := DefaultOptions(t.TempDir())
		if _, err := FromTar(context.Background(), bytes.NewReader(tars[i].Bytes()), &tboots[i], opts); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(tboots[0].Bytes(), tboots[1].Bytes()) {
		t.Errorf("two tarfs builds of one tar differ")
	}
}

// TestFsckErofs asks erofs-utils' fsck to check and extract what it can
// read: the bootstrap with the uncompressed blob as its extra device.
func TestFsckErofs(t *testing.T) {
	testutil.RequireTool(t, "fsck.erofs")
	src := sourceTree(t)
	want := snapshot(t, src, nil)
	for name, set := range map[string]func(*Options){
		"zstd-1m": func(*Options) {},
		"lz4-sha256-64k": func(o *Options) {
			o.Compressor, o.Digester, o.ChunkSize = rafs.CompressLZ4Block, rafs.DigestSHA256, 64<<10
		},
	} {
		t.Run(name, func(t *testing.T) {
			opts := DefaultOptions(t.TempDir())
			set(&opts)
			boot, _ := buildDir(t, src, opts)
			bb, err := os.ReadFile(boot)
			if err != nil {
				t.Fatal(err)
			}
			bi := readBoot(t, bb)
			raw := uncompressedBlob(t, filepath.Join(opts.BlobDir, string(bytes.TrimRight(bi.slots[0].BlobID[:], "\x00"))), bi.blobs[0])
			out := filepath.Join(t.TempDir(), "extract")
			cmd := exec.Command("fsck.erofs", "--device="+raw, "--extract="+out, boot)
			if msg, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %v\n%s", cmd.Args, err, msg)
			}
			// fsck.erofs 1.5 extracts regular files, directories and
			// symlinks (no xattrs, devices or sockets); compare those.
			got := snapshot(t, out, nil)
			n := 0
			for p, w := range want {
				g, ok := got[p]
				if w.Type != "reg" && w.Type != "dir" && w.Type != "symlink" {
					continue
				}
				n++
				if !ok {
					t.Errorf("fsck.erofs did not extract %q", p)
				} else if w.Type != g.Type || w.SHA256 != g.SHA256 || w.Target != g.Target || w.Size != g.Size {
					t.Errorf("fsck.erofs extracted %q as %+v, want %+v", p, g, w)
				}
			}
			t.Logf("fsck.erofs checked the image and extracted %d paths identical to the source", n)
		})
	}
}

package main

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// lazyTestImage writes the two layer directories of a test image: a base
// (small files first, then one large compressible file, a hardlink, a
// symlink, an xattr) and changes (a whiteout, an opaque directory, a
// directory replaced by a file, a new small file).
func lazyTestImage(t *testing.T, dir string) (base, changes string) {
	t.Helper()
	base, changes = filepath.Join(dir, "base"), filepath.Join(dir, "changes")
	write := func(p string, data []byte) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(12, 12))
	text := func(n int) []byte {
		var b bytes.Buffer
		for b.Len() < n {
			if rng.IntN(4) == 0 {
				for range 64 {
					b.WriteByte(byte(rng.Uint32()))
				}
			}
			b.WriteString("some text that compresses, as binaries and libraries do\n")
		}
		return b.Bytes()[:n]
	}
	write(filepath.Join(base, "etc/hostname"), []byte("lazy\n"))
	write(filepath.Join(base, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"))
	write(filepath.Join(base, "opt/old/a"), []byte("old a\n"))
	write(filepath.Join(base, "var/cache/stale"), []byte("stale\n"))
	write(filepath.Join(base, "usr/lib/big.so"), text(12<<20))
	write(filepath.Join(base, "usr/share/doc"), text(100<<10))
	if err := os.Link(filepath.Join(base, "usr/share/doc"), filepath.Join(base, "usr/share/doc.link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../lib/big.so", filepath.Join(base, "usr/share/big")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(base, "etc/passwd"), "user.lazy", []byte("yes"), 0); err != nil {
		t.Logf("no xattr in the test image: %v", err)
	}
	write(filepath.Join(changes, "etc/.wh.hostname"), nil)
	write(filepath.Join(changes, "var/cache/.wh..wh..opq"), nil)
	write(filepath.Join(changes, "var/cache/fresh"), []byte("fresh\n"))
	write(filepath.Join(changes, "opt/old"), []byte("a file where a directory was\n"))
	write(filepath.Join(changes, "hello.txt"), []byte("hello from the top layer\n"))
	return base, changes
}

var rootHashRE = regexp.MustCompile(`(?m)^root hash: ([0-9a-f]{64})$`)

// scanNoDirMtime scans a tree for comparison with umoci's extraction,
// whose directory mtimes are extraction times.
func scanNoDirMtime(t *testing.T, dir string) map[string]*treecmp.Entry {
	t.Helper()
	m, err := treecmp.Scan(dir, treecmp.Options{SkipRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range m {
		if e.Type == "dir" {
			e.MtimeNsec = 0
		}
	}
	return m
}

// Issue 12 end to end through the binary and the kernel: index an image
// pushed to a registry; export --image from an empty cache gives a disk
// veritysetup accepts with index's root; serve --image from an empty cache,
// mounted through nbdfuse + loop, equals umoci's extraction; a changed
// index with --root-hash pinned is refused at start; a layer byte changed
// in the registry's storage gives EIO for the files it holds, others read.
func TestLazyOCIImage(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "nbdfuse", "umoci", "veritysetup")
	bin := buildBinary(t)
	addr, data := testregistry.StartDir(t)
	w := t.TempDir()
	base, changes := lazyTestImage(t, w)
	ref := addr + "/lazy/img:v1"
	layoutDir := filepath.Join(w, "layout")
	run(t, "go", "run", "../../scripts/mkoci", "-layout", layoutDir, "-tag", "v1", "-push", ref, "-insecure", base, changes)

	out := run(t, bin, "index", "--insecure", ref)
	m := rootHashRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("index printed no root hash:\n%s", out)
	}
	root := m[1]

	// export from an empty cache: the disk and its tree, index's root.
	disk := filepath.Join(w, "image.disk")
	out = run(t, bin, "export", "--image", ref, "--insecure", "--cache-dir", filepath.Join(w, "cache-export"), "-o", disk, "--verity")
	vi := parseVerityLine(t, out)
	if vi.root != root {
		t.Fatalf("export --image: root %s, index printed %s", vi.root, root)
	}
	if err := veritysetupVerify(disk, vi); err != nil {
		t.Fatalf("veritysetup verify of the lazily exported disk: %v", err)
	}

	// serve from an empty cache, mount, compare with umoci.
	want := scanNoDirMtime(t, filepath.Join(umociUnpackDir(t, layoutDir, "v1")))
	uri := startServe(t, bin, "--image", ref, "--insecure", "--cache-dir", filepath.Join(w, "cache-serve"), "--root-hash", root)
	mnt := mountNBD(t, uri)
	got := scanNoDirMtime(t, mnt)
	if diffs := treecmp.Diff(want, got, treecmp.Options{}); len(diffs) > 0 {
		t.Fatalf("lazy mount differs from umoci's extraction in %d ways:\n%s", len(diffs), treecmp.Summary(diffs, 30))
	}
	t.Logf("lazy mount: %d entries equal umoci's extraction", len(got))

	// A pinned root that is not the index's is refused at start, in one line.
	bad := strings.Repeat("0", 64)
	cmd := exec.Command(bin, "serve", "--listen", "unix:"+filepath.Join(w, "x.sock"), "--image", ref, "--insecure", "--root-hash", bad)
	msg, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(msg), "no usable index with root hash "+bad) || strings.Count(strings.TrimSpace(string(msg)), "\n") > 0 {
		t.Fatalf("serve with another root pinned: %v\n%s", err, msg)
	}

	// kill -9 while --prefetch-all fills the cache; with the base layer
	// then gone from the registry, a restart serves what was ready (the
	// exact bytes) and EIO for the rest, never anything unchecked.
	blobs, _ := filepath.Glob(filepath.Join(data, "docker/registry/v2/blobs/sha256/*/*/data"))
	var biggest string
	var size int64
	for _, b := range blobs {
		if st, err := os.Stat(b); err == nil && st.Size() > size {
			biggest, size = b, st.Size()
		}
	}
	killCache := filepath.Join(w, "cache-kill")
	cmd9, _, _ := startServeIn(t, bin, w, "--listen", "unix:"+filepath.Join(w, "k.sock"), "--image", ref, "--insecure", "--cache-dir", killCache, "--prefetch-all")
	time.Sleep(1500 * time.Millisecond) // ready bits become durable every second (FlushInterval)
	cmd9.Process.Kill()
	cmd9.Wait()
	if err := os.Rename(biggest, biggest+".away"); err != nil {
		t.Fatal(err)
	}
	uri = startServe(t, bin, "--image", ref, "--insecure", "--cache-dir", killCache)
	mnt = mountNBD(t, uri)
	wantBig, err := os.ReadFile(filepath.Join(umociUnpackDir(t, layoutDir, "v1"), "usr/lib/big.so"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(mnt, "usr/lib/big.so"))
	if err != nil {
		t.Fatal(err)
	}
	okReads, failed := 0, 0
	for off := 0; off < len(wantBig); off += 256 << 10 {
		b := make([]byte, min(256<<10, len(wantBig)-off))
		if _, err := f.ReadAt(b, int64(off)); err != nil {
			failed++
			continue
		}
		if !bytes.Equal(b, wantBig[off:off+len(b)]) {
			t.Fatalf("after kill -9 and restart: wrong bytes at %d of big.so", off)
		}
		okReads++
	}
	f.Close()
	t.Logf("after kill -9 at 1.5 s and restart, the layer gone: %d reads of 256 KiB from the cache, %d failed", okReads, failed)
	if okReads == 0 {
		t.Fatal("nothing cached before the kill was served after the restart")
	}
	if err := os.Rename(biggest+".away", biggest); err != nil {
		t.Fatal(err)
	}

	// Damage the base layer in the registry's storage, in the middle of
	// the large file: it reads as EIO from a fresh cache, the rest reads.
	flipByte(t, biggest, size/2)
	uri = startServe(t, bin, "--image", ref, "--insecure", "--cache-dir", filepath.Join(w, "cache-damaged"), "--root-hash", root)
	mnt = mountNBD(t, uri)
	if _, err := os.ReadFile(filepath.Join(mnt, "usr/lib/big.so")); err == nil {
		t.Fatal("a file over a changed layer byte was read")
	} else {
		t.Logf("damaged file: %v", err)
	}
	for _, p := range []string{"etc/passwd", "hello.txt", "var/cache/fresh", "opt/old"} {
		b, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil {
			t.Fatalf("%s, away from the damage: %v", p, err)
		}
		if w := want[p]; w == nil || w.Size != int64(len(b)) {
			t.Fatalf("%s: %d bytes", p, len(b))
		}
	}
}

// umociUnpackDir extracts LAYOUT:TAG with umoci and returns the rootfs.
func umociUnpackDir(t *testing.T, layoutDir, tag string) string {
	t.Helper()
	bundle := filepath.Join(t.TempDir(), "bundle")
	if out, err := exec.Command("umoci", "unpack", "--image", layoutDir+":"+tag, bundle).CombinedOutput(); err != nil {
		t.Fatalf("umoci unpack: %v\n%s", err, out)
	}
	return filepath.Join(bundle, "rootfs")
}

package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"net/http"
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

	// kill -9 while spans are filling: serve --fetch-all through a
	// throttled proxy, killed once part of the layers came; the restart
	// serves the right tree (every unit checked: nothing unverified is
	// served) and fetches less than the image (ready spans are reused).
	layerBytes := layerBlobBytes(t, data, ref)
	// A fill of about 6 s, killed at 70%: the cache fetches up to 4 MiB
	// of a layer per request (a few spans), so by then the first requests
	// have finished and been made durable (every second), others not.
	proxy := testregistry.Throttle(t, addr, max(layerBytes/6, 64<<10))
	slowRef := proxy.Addr + "/lazy/img:v1"
	killCache := filepath.Join(w, "cache-kill")
	started := time.Now()
	cmd9, _, _ := startServeIn(t, bin, w, "--listen", "unix:"+filepath.Join(w, "k.sock"), "--image", slowRef, "--insecure", "--cache-dir", killCache, "--fetch-all")
	artifactBytes := proxy.BlobBytes() // serve printed its URI: the index is in
	for proxy.BlobBytes()-artifactBytes < layerBytes*7/10 {
		if time.Since(started) > 60*time.Second {
			t.Fatalf("--fetch-all fetched %d of %d layer bytes in 60 s", proxy.BlobBytes()-artifactBytes, layerBytes)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd9.Process.Kill()
	cmd9.Wait()
	before := proxy.BlobBytes() - artifactBytes
	if before >= layerBytes {
		t.Fatalf("the kill came after the fill: %d of %d layer bytes fetched", before, layerBytes)
	}
	proxy.SetRate(0)
	proxy.ResetBlobBytes()
	uri = startServe(t, bin, "--image", slowRef, "--insecure", "--cache-dir", killCache)
	restartIndex := proxy.BlobBytes()
	mnt = mountNBD(t, uri)
	if diffs := treecmp.Diff(want, scanNoDirMtime(t, mnt), treecmp.Options{}); len(diffs) > 0 {
		t.Fatalf("after kill -9 mid-fill and restart, the tree differs from umoci's in %d ways:\n%s", len(diffs), treecmp.Summary(diffs, 30))
	}
	after := proxy.BlobBytes() - restartIndex
	t.Logf("kill -9 at %.1f s with %d of %d layer bytes fetched (index artifact %d bytes); restart: index %d bytes fetched, the whole tree read fetched %d layer bytes",
		time.Since(started).Seconds(), before, layerBytes, artifactBytes, restartIndex, after)
	if restartIndex > 4096 { // the image's config is fetched again, not the artifact
		t.Errorf("the restart fetched %d bytes before serving: the index artifact again (it is in --cache-dir)?", restartIndex)
	}
	if after >= layerBytes {
		t.Errorf("the restart fetched %d layer bytes, the whole image is %d: ready spans were not reused", after, layerBytes)
	}
	blobs, _ := filepath.Glob(filepath.Join(data, "docker/registry/v2/blobs/sha256/*/*/data"))
	var biggest string
	var size int64
	for _, b := range blobs {
		if st, err := os.Stat(b); err == nil && st.Size() > size {
			biggest, size = b, st.Size()
		}
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

// layerBlobBytes is the compressed size of ref's layers, from the
// registry's storage (data) and the manifest it serves.
func layerBlobBytes(t *testing.T, data, ref string) int64 {
	t.Helper()
	var total int64
	for _, p := range layerBlobPaths(t, data, ref) {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		total += st.Size()
	}
	return total
}

// layerBlobPaths are the files of ref's layer blobs in the registry's
// storage, in manifest order.
func layerBlobPaths(t *testing.T, data, ref string) []string {
	t.Helper()
	host, rest, _ := strings.Cut(ref, "/")
	repo, tag, _ := strings.Cut(rest, ":")
	req, _ := http.NewRequest("GET", "http://"+host+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Layers []struct{ Digest string } `json:"layers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || len(m.Layers) == 0 {
		t.Fatalf("manifest of %s: %v (%d layers)", ref, err, len(m.Layers))
	}
	var out []string
	for _, l := range m.Layers {
		hex := strings.TrimPrefix(l.Digest, "sha256:")
		out = append(out, filepath.Join(data, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data"))
	}
	return out
}

// Issue 12's prefetch, through the binary and the kernel: what the index
// lists (--prefetch-files), what serve --record-trace recorded
// (--prefetch-trace), and serve --fetch-all are fetched with no client
// reading; a restart with the layers gone from the registry serves them
// from the cache (and only them: the rest gives EIO).
func TestLazyOCIPrefetch(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "nbdfuse", "umoci")
	bin := buildBinary(t)
	addr, data := testregistry.StartDir(t)
	w := t.TempDir()
	base, changes := lazyTestImage(t, w)
	ref := addr + "/lazy/pf:v1"
	layoutDir := filepath.Join(w, "layout")
	run(t, "go", "run", "../../scripts/mkoci", "-layout", layoutDir, "-tag", "v1", "-push", ref, "-insecure", base, changes)
	want := scanNoDirMtime(t, umociUnpackDir(t, layoutDir, "v1"))
	blobs := layerBlobPaths(t, data, ref)
	proxy := testregistry.Throttle(t, addr, 0)
	pref := proxy.Addr + "/lazy/pf:v1"

	// fill serves pref with a fresh cache and args, no client reading,
	// until the registry has sent nothing for a second; then stops it.
	fill := func(cache string, args ...string) int64 {
		t.Helper()
		proxy.ResetBlobBytes()
		sock := filepath.Join(t.TempDir(), "s.sock")
		cmd, _, stderr := startServeIn(t, bin, w, append([]string{"--listen", "unix:" + sock, "--image", pref, "--insecure", "--cache-dir", cache}, args...)...)
		last, still := proxy.BlobBytes(), 0
		for deadline := time.Now().Add(30 * time.Second); still < 10; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("serve %v kept fetching for 30 s", args)
			}
			if n := proxy.BlobBytes(); n != last {
				last, still = n, 0
			} else {
				still++
			}
		}
		cmd.Process.Signal(os.Interrupt)
		if code := waitExit(t, cmd, 15*time.Second); code != 0 {
			t.Fatalf("serve %v exited %d:\n%s", args, code, stderr)
		}
		return proxy.BlobBytes()
	}
	// layersGone runs f with the image's layer blobs moved away.
	layersGone := func(f func()) {
		t.Helper()
		for _, b := range blobs {
			if err := os.Rename(b, b+".away"); err != nil {
				t.Fatal(err)
			}
		}
		defer func() {
			for _, b := range blobs {
				os.Rename(b+".away", b)
			}
		}()
		f()
	}
	readable := func(mnt, p string) bool {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil {
			return false
		}
		if e := want[p]; e == nil || e.Size != int64(len(b)) {
			t.Fatalf("%s: read %d bytes that are not umoci's file", p, len(b))
		}
		return true
	}

	// Without a list nothing but the index is fetched.
	run(t, bin, "index", "--insecure", ref)
	plain := fill(filepath.Join(w, "cache-none"))

	// --prefetch-files: usr/share/doc (100 KiB of the base layer) only.
	list := filepath.Join(w, "prefetch.txt")
	if err := os.WriteFile(list, []byte("# what the app opens first\n/usr/share/doc\n\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := run(t, bin, "index", "--insecure", "--prefetch-files", list, ref); !strings.Contains(out, "published") {
		t.Fatalf("index --prefetch-files: %s", out)
	}
	cacheFiles := filepath.Join(w, "cache-files")
	listed := fill(cacheFiles)
	t.Logf("fetched with no reads: %d bytes without a prefetch list, %d with --prefetch-files", plain, listed)
	if listed <= plain {
		t.Fatalf("the index's prefetch list fetched nothing (%d bytes, %d without)", listed, plain)
	}
	layersGone(func() {
		mnt := mountNBD(t, startServe(t, bin, "--image", pref, "--insecure", "--cache-dir", cacheFiles))
		if !readable(mnt, "usr/share/doc") {
			t.Fatal("usr/share/doc, in the prefetch list, was not cached")
		}
		if readable(mnt, "usr/lib/big.so") {
			t.Fatal("usr/lib/big.so, not in the list, read with its layer gone")
		}
	})

	// --record-trace: a workload reads hello.txt; the trace names it, and
	// an index of the trace makes serving fetch it first.
	trace := filepath.Join(w, "trace.txt")
	sock := filepath.Join(w, "t.sock")
	cmd, uri, stderr := startServeIn(t, bin, w, "--listen", "unix:"+sock, "--image", pref, "--insecure", "--cache-dir", filepath.Join(w, "cache-trace"), "--record-trace", trace)
	mnt := mountNBD(t, uri)
	if !readable(mnt, "hello.txt") {
		t.Fatal("hello.txt: not readable")
	}
	cmd.Process.Signal(os.Interrupt)
	if code := waitExit(t, cmd, 15*time.Second); code != 0 {
		t.Fatalf("serve --record-trace exited %d:\n%s", code, stderr)
	}
	tb, err := os.ReadFile(trace)
	if err != nil || !regexp.MustCompile(`(?m)^\d+ \d+ /hello\.txt$`).Match(tb) {
		t.Fatalf("the trace does not name /hello.txt (%v):\n%s", err, tb)
	}
	if out := run(t, bin, "index", "--insecure", "--prefetch-trace", trace, ref); !strings.Contains(out, "published") {
		t.Fatalf("index --prefetch-trace: %s", out)
	}
	cacheTrace := filepath.Join(w, "cache-traced")
	traced := fill(cacheTrace)
	layersGone(func() {
		mnt := mountNBD(t, startServe(t, bin, "--image", pref, "--insecure", "--cache-dir", cacheTrace))
		if !readable(mnt, "hello.txt") {
			t.Fatal("hello.txt, in the trace, was not cached")
		}
		if readable(mnt, "usr/share/doc") {
			t.Fatal("usr/share/doc, not in the trace, read with its layer gone")
		}
	})

	// --fetch-all: everything, the tree equals umoci's with the layers gone.
	cacheAll := filepath.Join(w, "cache-all")
	all := fill(cacheAll, "--fetch-all")
	t.Logf("fetched with no reads: %d bytes with the trace's index, %d with --fetch-all (layers: %d bytes)", traced, all, layerBlobBytes(t, data, ref))
	layersGone(func() {
		mnt := mountNBD(t, startServe(t, bin, "--image", pref, "--insecure", "--cache-dir", cacheAll))
		if diffs := treecmp.Diff(want, scanNoDirMtime(t, mnt), treecmp.Options{}); len(diffs) > 0 {
			t.Fatalf("after --fetch-all, with the layers gone: %d differences from umoci's tree:\n%s", len(diffs), treecmp.Summary(diffs, 30))
		}
	})
}

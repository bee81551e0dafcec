package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testtree"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// End to end through the binary and the judges: rafsnbd create, export
// --verity (veritysetup), a kernel loop mount, rafsnbd serve read by nbdcopy
// and mounted through nbdfuse + loop, and lazy reads from a real registry.

// buildBinary compiles rafsnbd once per test.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rafsnbd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// verityLine parses nydus' "dm-verity options:" line into veritysetup
// arguments, the hash offset and the root hash.
var verityLineRE = regexp.MustCompile(`^dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 --data-block-size=(\d+) --hash-block-size=4096 --data-blocks (\d+) --hash-offset (\d+) ([0-9a-f]{64})$`)

type verityInfo struct {
	args       []string
	dataBytes  int64 // the device: data blocks × data block size
	hashOffset int64 // the device rounded up to 4 KiB
	root       string
}

func parseVerityLine(t *testing.T, out string) verityInfo {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if m := verityLineRE.FindStringSubmatch(line); m != nil {
			off, _ := strconv.ParseInt(m[3], 10, 64)
			bs, _ := strconv.ParseInt(m[1], 10, 64)
			blocks, _ := strconv.ParseInt(m[2], 10, 64)
			return verityInfo{
				dataBytes: bs * blocks,
				args: []string{"--no-superblock", "--format=1", "--salt=-", "--hash=sha256",
					"--data-block-size=" + m[1], "--hash-block-size=4096", "--data-blocks=" + m[2], "--hash-offset=" + m[3]},
				hashOffset: off, root: m[4],
			}
		}
	}
	t.Fatalf("no dm-verity options line in:\n%s", out)
	return verityInfo{}
}

func veritysetupVerify(disk string, v verityInfo) error {
	args := append(append([]string{"verify"}, v.args...), disk, disk, v.root)
	out, err := exec.Command("veritysetup", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x01
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// mountLoop mounts an EROFS image file read-only through a loop device
// limited to size bytes, and returns the mount point.
func mountLoop(t *testing.T, file string, size int64) string {
	t.Helper()
	loop := strings.TrimSpace(run(t, "losetup", "-f", "--show", "-r", "--sizelimit", strconv.FormatInt(size, 10), file))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	return testutil.MountErofs(t, loop)
}

// startServe runs `rafsnbd serve` on a unix socket until the test ends and
// returns the NBD URI of its first export.
func startServe(t *testing.T, bin string, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd, uri, stderr := startServeIn(t, bin, "", append([]string{"--listen", "unix:" + sock}, args...)...)
	t.Cleanup(func() { // before startServeIn's kill: SIGINT must stop it
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("rafsnbd serve did not stop on SIGINT; stderr:\n%s", stderr.String())
		}
	})
	if !strings.HasPrefix(uri, "nbd+unix://") {
		t.Fatalf("serve printed %q; stderr:\n%s", uri, stderr.String())
	}
	return uri
}

// mountNBD mounts an NBD export the way this machine can: nbdfuse turns it
// into a file, a loop device into a block device, and the kernel mounts it.
func mountNBD(t *testing.T, uri string) string {
	t.Helper()
	fuseDir := t.TempDir()
	pidFile := filepath.Join(t.TempDir(), "nbdfuse.pid")
	cmd := exec.Command("nbdfuse", "-r", "-P", pidFile, filepath.Join(fuseDir, "disk"), uri)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", fuseDir).Run()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	for i := 0; ; i++ {
		if st, err := os.Stat(pidFile); err == nil && st.Size() > 0 {
			break
		}
		if i > 300 {
			t.Fatalf("nbdfuse did not come up: %s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	st, err := os.Stat(filepath.Join(fuseDir, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	return mountLoop(t, filepath.Join(fuseDir, "disk"), st.Size())
}

func requireTree(t *testing.T, want map[string]*treecmp.Entry, mnt, what string) {
	t.Helper()
	got, err := treecmp.Scan(mnt, treecmp.Options{SkipRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	if diffs := treecmp.Diff(want, got, treecmp.Options{}); len(diffs) > 0 {
		t.Fatalf("%s: %d differences from the source:\n%s", what, len(diffs), treecmp.Summary(diffs, 30))
	}
	t.Logf("%s: %d entries equal the source", what, len(got))
}

func fileSHA256(t *testing.T, path string, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(h, f, n); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestEndToEnd(t *testing.T) {
	testutil.SkipShort(t)
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "veritysetup", "nbdfuse", "nbdcopy", "losetup", "mount", "fusermount3")
	bin := buildBinary(t)
	work := t.TempDir()
	src := filepath.Join(work, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	testtree.Make(t, src)
	want, err := treecmp.Scan(src, treecmp.Options{SkipRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(work, "src.tar")
	tf, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	testtree.WriteTar(t, src, tf)
	tf.Close()
	// A tar cannot hold sockets; everything else must come through.
	wantTar := map[string]*treecmp.Entry{}
	for p, e := range want {
		if e.Type != "sock" {
			wantTar[p] = e
		}
	}

	for _, c := range []struct {
		name   string
		create []string
		want   map[string]*treecmp.Entry
	}{
		{"dir-zstd", []string{src}, want},
		{"tarfs", []string{"--type", "tarfs", tarPath}, wantTar},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			boot, blobs := filepath.Join(dir, "image.boot"), filepath.Join(dir, "blobs")
			run(t, bin, append([]string{"--log-level", "warn", "create", "-B", boot, "-D", blobs}, c.create...)...)
			disk := filepath.Join(dir, "image.disk")
			v := parseVerityLine(t, run(t, bin, "--log-level", "warn", "export", "-B", boot, "-D", blobs, "-o", disk, "--verity"))

			// veritysetup is the judge of the tree, and its own format
			// over the same data gives the same root.
			if err := veritysetupVerify(disk, v); err != nil {
				t.Fatalf("veritysetup verify rejects our tree: %v", err)
			}
			data := filepath.Join(dir, "data.img")
			run(t, "sh", "-c", fmt.Sprintf("head -c %d %s > %s", v.dataBytes, disk, data))
			fmtArgs := append(append([]string{"format"}, v.args[:len(v.args)-1]...), data, filepath.Join(dir, "hash.img"))
			if m := regexp.MustCompile(`Root hash:\s+([0-9a-f]+)`).FindStringSubmatch(run(t, "veritysetup", fmtArgs...)); m == nil || m[1] != v.root {
				t.Fatalf("veritysetup format root %v, ours %s", m, v.root)
			}

			requireTree(t, c.want, mountLoop(t, disk, v.dataBytes), "loop mount of the export")

			uri := startServe(t, bin, "-B", boot, "-D", blobs)
			copied := filepath.Join(dir, "copied.img")
			run(t, "nbdcopy", uri, copied)
			if st, err := os.Stat(copied); err != nil || st.Size() != v.dataBytes {
				t.Fatalf("nbdcopy wrote %v bytes (%v), want the device's %d", st.Size(), err, v.dataBytes)
			}
			if got, wantSum := fileSHA256(t, copied, v.dataBytes), fileSHA256(t, disk, v.dataBytes); got != wantSum {
				t.Fatalf("nbdcopy of the served image: sha256 %s, export's data %s", got, wantSum)
			}
			requireTree(t, c.want, mountNBD(t, uri), "NBD (nbdfuse + loop) mount")

			// One flipped byte in the data, or in the tree, must fail verification.
			for _, off := range []int64{v.dataBytes / 2, v.hashOffset + 100} {
				bad := filepath.Join(dir, "bad.disk")
				run(t, "cp", "--sparse=always", disk, bad)
				flipByte(t, bad, off)
				if err := veritysetupVerify(bad, v); err == nil {
					t.Fatalf("veritysetup accepted a disk with byte %d flipped", off)
				}
			}
		})
	}

	t.Run("registry-lazy", func(t *testing.T) {
		testutil.RequireTool(t, "docker-registry")
		dir := t.TempDir()
		boot, blobs := filepath.Join(dir, "image.boot"), filepath.Join(dir, "blobs")
		run(t, bin, "--log-level", "warn", "create", "-B", boot, "-D", blobs, src)
		ents, err := os.ReadDir(blobs)
		if err != nil || len(ents) != 1 {
			t.Fatalf("want one blob in %s: %v %v", blobs, ents, err)
		}
		blobID := ents[0].Name()
		blob, err := os.ReadFile(filepath.Join(blobs, blobID))
		if err != nil {
			t.Fatal(err)
		}
		addr := testregistry.Start(t)
		testregistry.PushBlob(t, addr, "e2e/image", blobID, blob)

		// A proxy in front of the registry counts the blob bytes fetched.
		target, _ := url.Parse("http://" + addr)
		var fetched atomic.Int64
		rp := httputil.NewSingleHostReverseProxy(target)
		rp.ModifyResponse = func(r *http.Response) error {
			if strings.Contains(r.Request.URL.Path, "/blobs/") {
				r.Body = countingBody{r.Body, &fetched}
			}
			return nil
		}
		proxy := httptest.NewServer(rp)
		t.Cleanup(proxy.Close)

		uri := startServe(t, bin, "-B", boot, "--registry", strings.TrimPrefix(proxy.URL, "http://")+"/e2e/image",
			"--insecure", "--cache-dir", filepath.Join(dir, "cache"))
		mnt := mountNBD(t, uri)
		small, err := os.ReadFile(filepath.Join(mnt, "files", "one"))
		if err != nil || string(small) != "1" {
			t.Fatalf("reading files/one through the lazy image: %q, %v", small, err)
		}
		afterOne := fetched.Load()
		t.Logf("mount + one small file fetched %d of %d blob bytes (%.2f%%)", afterOne, len(blob), 100*float64(afterOne)/float64(len(blob)))
		if afterOne >= int64(len(blob))/4 {
			t.Errorf("mount + one small file fetched %d of %d blob bytes: not lazy", afterOne, len(blob))
		}
		requireTree(t, want, mnt, "lazy registry image over NBD")
		t.Logf("after reading everything: %d bytes fetched for a %d-byte blob", fetched.Load(), len(blob))
	})
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// rafsnbd verity format/verify on a plain file, judged by veritysetup: same
// root and same hash file as `veritysetup format`, and each tool accepts
// the other's tree and rejects a corrupted one.
func TestVerityCommandMatchesVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	bin := buildBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data.img")
	run(t, "sh", "-c", "head -c 3000000 /dev/urandom > "+data+" && truncate -s 3145728 "+data)
	for _, bs := range []string{"512", "4096"} {
		ours, theirs := filepath.Join(dir, "ours."+bs), filepath.Join(dir, "theirs."+bs)
		salt := "5a17"
		out := run(t, bin, "--log-level", "warn", "verity", "format", "--data-block-size", bs, "--salt", salt, data, ours)
		vs := run(t, "veritysetup", "format", "--no-superblock", "--format=1", "--hash=sha256", "--data-block-size="+bs,
			"--hash-block-size=4096", "--salt="+salt, data, theirs)
		m := regexp.MustCompile(`Root hash:\s+([0-9a-f]{64})`).FindStringSubmatch(vs)
		if m == nil || !strings.Contains(out, m[1]) {
			t.Fatalf("bs %s: veritysetup root %v not in our output:\n%s", bs, m, out)
		}
		root := m[1]
		ourTree, err1 := os.ReadFile(ours)
		theirTree, err2 := os.ReadFile(theirs)
		if err1 != nil || err2 != nil || len(ourTree) == 0 || !bytes.Equal(ourTree, theirTree) {
			t.Fatalf("bs %s: our hash file (%d bytes) differs from veritysetup's (%d bytes)", bs, len(ourTree), len(theirTree))
		}
		vsArgs := []string{"verify", "--no-superblock", "--format=1", "--hash=sha256", "--data-block-size=" + bs,
			"--hash-block-size=4096", "--salt=" + salt, data, ours, root}
		run(t, "veritysetup", vsArgs...)
		run(t, bin, "--log-level", "warn", "verity", "verify", "--data-block-size", bs, "--salt", salt, data, theirs, root)
		bad := filepath.Join(dir, "bad.img")
		run(t, "cp", data, bad)
		flipByte(t, bad, 1234567)
		if err := exec.Command(bin, "--log-level", "error", "verity", "verify", "--data-block-size", bs, "--salt", salt, bad, ours, root).Run(); err == nil {
			t.Fatalf("bs %s: rafsnbd verity verify accepted corrupted data", bs)
		}
	}
}

// One serve, several exports: the same image twice through one lazy cache
// (the cache is locked per process, so both must share it) and a flat disk;
// nbdcopy of each gives the fixture's golden device bytes.
func TestServeSeveralImages(t *testing.T) {
	testutil.RequireTool(t, "nbdcopy", "nbdinfo")
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	const deviceSHA = "817ff91aaaabde208168c2086395e3dbd75d89239d3ef79a84302aa38b2bf2e6"
	bin := buildBinary(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "fixture.disk")
	run(t, bin, "--log-level", "warn", "export", "-B", boot, "-D", filepath.Dir(boot), "-o", disk)
	uri := startServe(t, bin, "-B", boot, "-B", boot, "-D", filepath.Dir(boot), "--cache-dir", filepath.Join(dir, "cache"),
		"--disk", disk, "--name", "first", "--name", "second", "--name", "flat")
	list := run(t, "nbdinfo", "--list", "--json", uri)
	for _, name := range []string{"first", "second", "flat"} {
		if !strings.Contains(list, `"export-name": "`+name+`"`) {
			t.Fatalf("export %q missing from nbdinfo --list:\n%s", name, list)
		}
		out := filepath.Join(dir, name+".img")
		run(t, "nbdcopy", strings.Replace(uri, "/first?", "/"+name+"?", 1), out)
		if got := fileSHA256(t, out, 2134016); got != deviceSHA {
			t.Errorf("export %s: sha256 %s, want %s", name, got, deviceSHA)
		}
	}
}

package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// Every command that writes a file refuses an existing output that is not
// a regular file, with one line naming it, and leaves it as it was: export
// -o /dev/null used to rename a file over the device node.
func TestOutputsRefuseNonRegular(t *testing.T) {
	work := t.TempDir()
	src := filepath.Join(work, "src")
	os.Mkdir(src, 0o755)
	os.WriteFile(filepath.Join(src, "a"), []byte("hello"), 0o644)
	boot, blobs := filepath.Join(work, "image.boot"), filepath.Join(work, "blobs")
	if code, _, stderr := runLine(t, "create", "-B", boot, "-D", blobs, src); code != 0 {
		t.Fatalf("create: exit %d: %s", code, stderr)
	}
	data := filepath.Join(work, "data")
	os.WriteFile(data, make([]byte, 64<<10), 0o644)
	elsewhere := filepath.Join(work, "elsewhere")
	os.WriteFile(elsewhere, []byte("keep me"), 0o644)

	targets := []struct {
		name string
		root bool
		mk   func(string) error
		want string
	}{
		{"char device", true, func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))) },
			": not a regular file (a character device); refusing to replace it"},
		{"symlink", false, func(p string) error { return os.Symlink(elsewhere, p) },
			": not a regular file (a symbolic link to " + elsewhere + "); refusing to replace it"},
		{"directory", false, func(p string) error { return os.Mkdir(p, 0o755) }, " is a directory; refusing to replace it"},
	}
	commands := map[string]func(out string) []string{
		"export -o":          func(out string) []string { return []string{"export", "-B", boot, "-D", blobs, "-o", out} },
		"create -B":          func(out string) []string { return []string{"create", "-B", out, "-D", blobs, src} },
		"verity format HASH": func(out string) []string { return []string{"verity", "format", data, out} },
	}
	for _, tg := range targets {
		for cname, args := range commands {
			t.Run(tg.name+"/"+cname, func(t *testing.T) {
				if tg.root {
					testutil.RequireRoot(t)
				}
				dir := t.TempDir()
				out := filepath.Join(dir, "out")
				if err := tg.mk(out); err != nil {
					t.Fatal(err)
				}
				before, _ := os.Lstat(out)
				code, stdout, stderr := runLine(t, args(out)...)
				if want := "rafsnbd: " + out + tg.want + "\n"; code != 1 || stdout != "" || stderr != want {
					t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", code, stdout, stderr, want)
				}
				after, _ := os.Lstat(out)
				if after.Mode() != before.Mode() {
					t.Errorf("%s is now %v, was %v", out, after.Mode(), before.Mode())
				}
				if ents, _ := os.ReadDir(dir); len(ents) != 1 {
					t.Errorf("left behind: %v", ents)
				}
			})
		}
	}
	if got, _ := os.ReadFile(elsewhere); string(got) != "keep me" {
		t.Errorf("the symlink's target now holds %q", got)
	}
}

// Errors about outputs name the user's path and the reason, not the hidden
// temporary (was "open /nonexist/.x.disk.tmp-639132570: ...").
func TestOutputErrorsNamePath(t *testing.T) {
	work := t.TempDir()
	src := filepath.Join(work, "src")
	os.Mkdir(src, 0o755)
	boot, blobs := filepath.Join(work, "image.boot"), filepath.Join(work, "blobs")
	if code, _, stderr := runLine(t, "create", "-B", boot, "-D", blobs, src); code != 0 {
		t.Fatalf("create: exit %d: %s", code, stderr)
	}
	missing := filepath.Join(work, "nonexist", "x")
	for _, args := range [][]string{
		{"export", "-B", boot, "-D", blobs, "-o", missing},
		{"create", "-B", missing, "-D", blobs, src},
	} {
		code, _, stderr := runLine(t, args...)
		if want := "rafsnbd: cannot write " + missing + ": no such directory\n"; code != 1 || stderr != want {
			t.Errorf("%s: exit %d, stderr %q; want %q", args[0], code, stderr, want)
		}
	}
}

// An interrupted or killed verity format leaves DATA as it was: the tree
// used to be appended as it was built, so DATA grew by part of a tree that
// a second format then counted as data.
func TestVerityFormatInterruptLeavesData(t *testing.T) {
	testutil.SkipShort(t)
	bin := buildBinary(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data.img")
			// 512 MiB, sparse but for random data at both ends: formatting
			// takes seconds here, the signal comes well before the end.
			f, err := os.Create(data)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.NewChaCha8([32]byte{9})
			chunk := make([]byte, 1<<20)
			for _, off := range []int64{0, 511 << 20} {
				rng.Read(chunk)
				if _, err := f.WriteAt(chunk, off); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
			before := sparseDigest(t, data)

			cmd := exec.Command(bin, "verity", "format", data)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Signal once the format is under way: the tree's temporary
			// exists (or, as formats used to, DATA grew), or after 1.5 s.
			for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline) && len(temps(dir)) == 0; {
				if st, err := os.Stat(data); err == nil && st.Size() != 512<<20 {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			cmd.Process.Signal(sig)
			err = cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("format was not interrupted: %v", err)
			}
			if sig == syscall.SIGINT && (ee.ExitCode() != exitInterrupted || !strings.Contains(stderr.String(), "interrupted")) {
				t.Errorf("exit %d, stderr %q; want %d, interrupted", ee.ExitCode(), stderr.String(), exitInterrupted)
			}
			if after := sparseDigest(t, data); after != before {
				t.Errorf("DATA changed:\n was %s\n now %s", before, after)
			}
			switch left := temps(dir); {
			case sig == syscall.SIGINT && len(left) != 0:
				t.Errorf("temporaries left after SIGINT: %v", left)
			case sig == syscall.SIGKILL:
				t.Logf("after SIGKILL, left for cache gc: %v", left)
			}
		})
	}
}

// temps lists the atomicfile temporaries in dir.
func temps(dir string) []string {
	var names []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if atomicfile.IsTemp(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names
}

// sparseDigest describes a sparse file without reading its holes: its
// size, and where each data extent is with the sha256 of its bytes.
func sparseDigest(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	desc := fmt.Sprintf("size %d", st.Size())
	for off := int64(0); off < st.Size(); {
		start, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil { // ENXIO: only a hole to the end
			break
		}
		end, err := unix.Seek(int(f.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, start, end-start)); err != nil {
			t.Fatal(err)
		}
		desc += fmt.Sprintf("; [%d,%d) %s", start, end, hex.EncodeToString(h.Sum(nil))[:16])
		off = end
	}
	return desc
}

// A block device is the one kind of existing non-regular output written
// in place, and only as a verity HASHFILE (as veritysetup's hash device);
// export -o onto one is refused like any device node.
func TestOutputsOnBlockDevice(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "losetup")
	work := t.TempDir()
	data, hashImg, hashFile := filepath.Join(work, "data"), filepath.Join(work, "hash.img"), filepath.Join(work, "hash")
	buf := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{5}).Read(buf)
	os.WriteFile(data, buf, 0o644)
	os.WriteFile(hashImg, make([]byte, 64<<10), 0o644)
	out, err := exec.Command("losetup", "-f", "--show", hashImg).CombinedOutput()
	if err != nil {
		testutil.Unavailable(t, "losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })

	code, stdout, stderr := runLine(t, "verity", "format", data, dev)
	if code != 0 {
		t.Fatalf("verity format onto %s: exit %d: %s", dev, code, stderr)
	}
	if code, want, stderr := runLine(t, "verity", "format", data, hashFile); code != 0 || want != stdout {
		t.Fatalf("verity format into a file: exit %d, %q (device: %q): %s", code, want, stdout, stderr)
	}
	tree, _ := os.ReadFile(hashFile)
	img, _ := os.ReadFile(hashImg)
	if st, _ := os.Stat(dev); !bytes.Equal(img[:len(tree)], tree) || st.Mode()&os.ModeDevice == 0 {
		t.Errorf("the loop device does not hold the tree, or is no longer a device (%v)", st.Mode())
	}

	src := filepath.Join(work, "src")
	os.Mkdir(src, 0o755)
	boot, blobs := filepath.Join(work, "image.boot"), filepath.Join(work, "blobs")
	if code, _, stderr := runLine(t, "create", "-B", boot, "-D", blobs, src); code != 0 {
		t.Fatalf("create: exit %d: %s", code, stderr)
	}
	code, _, stderr = runLine(t, "export", "-B", boot, "-D", blobs, "-o", dev)
	if want := "rafsnbd: " + dev + ": not a regular file (a block device); refusing to replace it\n"; code != 1 || stderr != want {
		t.Errorf("export -o %s: exit %d, stderr %q; want %q", dev, code, stderr, want)
	}
}

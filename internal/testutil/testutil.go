// Package testutil holds the few helpers every package's tests share: where
// the shared fixtures live, and how a test that needs root or an external
// tool bows out.
//
// A test that cannot run here skips with a reason. Under RAFSNBD_STRICT=1
// (set by scripts/test.sh in CI, which installs every tool and runs as root)
// the same condition is a failure instead, so a green CI never hides a
// skipped check.
package testutil

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Strict reports whether missing prerequisites must fail tests instead of
// skipping them.
func Strict() bool { return os.Getenv("RAFSNBD_STRICT") == "1" }

// Unavailable skips the test, or fails it in strict mode, with the reason.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if Strict() {
		t.Fatalf("prerequisite missing under RAFSNBD_STRICT=1: "+format, args...)
	}
	t.Skipf("skipping: "+format, args...)
}

// RequireRoot bows out unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root (mount, losetup, FUSE)")
	}
}

// RequireTool bows out unless every named program is on PATH, and returns
// the path of the first.
func RequireTool(t testing.TB, names ...string) string {
	t.Helper()
	first := ""
	for _, name := range names {
		p, err := exec.LookPath(name)
		if err != nil {
			Unavailable(t, "%s not found on PATH (scripts/test.sh installs it)", name)
			return ""
		}
		if first == "" {
			first = p
		}
	}
	return first
}

// SkipShort skips long tests under -short; never an error, even in strict mode.
func SkipShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping in -short mode")
	}
}

// FixturesDir returns the absolute path of ../shared/fixtures as seen from
// the repository root, bowing out when it is absent.
func FixturesDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(RepoRoot(t), "..", "shared", "fixtures")
	if _, err := os.Stat(dir); err != nil {
		Unavailable(t, "fixtures not found at %s (the shared/ folder sits beside the repository)", dir)
		return ""
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

// NydusFixture returns the path of a file in ../shared/fixtures/nydus.
func NydusFixture(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(FixturesDir(t), "nydus", name)
	if _, err := os.Stat(p); err != nil {
		Unavailable(t, "fixture %s not found", p)
	}
	return p
}

// RepoRoot returns the repository root (the directory holding go.mod).
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("testutil: cannot locate source file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// MountErofs mounts an EROFS image (a file with "loop" among opts, or a
// block device) read-only on a new temporary directory, adding opts to
// "ro", and unmounts it when the test ends. A failed mount fails the test
// with the kernel's last messages.
func MountErofs(t testing.TB, source string, opts ...string) string {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "mount", "umount")
	mnt := t.TempDir()
	args := []string{"-t", "erofs", "-o", strings.Join(append([]string{"ro"}, opts...), ","), source, mnt}
	if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
		dmesg, _ := exec.Command("sh", "-c", "dmesg | tail -5").Output()
		t.Fatalf("mount %v: %v\n%s\ndmesg:\n%s", args, err, out, dmesg)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

// Losetup attaches file to a free read-only loop device and detaches it
// when the test ends; register it before a mount that uses the device, so
// that the mount goes first.
func Losetup(t testing.TB, file string) string {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "losetup")
	out, err := exec.Command("losetup", "-f", "--show", "-r", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// FileSHA256 is the hex sha256 of a file's content.
func FileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

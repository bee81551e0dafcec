package blockdev

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/verity"
)

// Export onto something that is not a regular file is refused and leaves
// it as it was: a rename over /dev/null used to turn it into a plain file.
func TestExportRefusesNonRegularTargets(t *testing.T) {
	dev, err := New(64<<10, 4096, []Extent{{Name: "e", Offset: 0, Length: 8192, Source: bytes.NewReader(bytes.Repeat([]byte{7}, 8192))}})
	if err != nil {
		t.Fatal(err)
	}
	elsewhere := filepath.Join(t.TempDir(), "elsewhere")
	if err := os.WriteFile(elsewhere, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		root bool
		mk   func(path string) error
		want string
	}{
		{"char device", true, func(p string) error {
			return syscall.Mknod(p, syscall.S_IFCHR|0o666, 1<<8|3) // /dev/null's numbers
		}, ": not a regular file (a character device); refusing to replace it"},
		{"symlink", false, func(p string) error { return os.Symlink(elsewhere, p) },
			": not a regular file (a symbolic link to " + elsewhere + "); refusing to replace it"},
		{"directory", false, func(p string) error { return os.Mkdir(p, 0o755) }, " is a directory; refusing to replace it"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.root {
				testutil.RequireRoot(t)
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "x.disk")
			if err := c.mk(path); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Lstat(path)
			p := verity.NydusParams(uint64(dev.Size()), 4096)
			_, err := Export(context.Background(), dev, path, ExportOptions{Verity: &p})
			if !errors.Is(err, atomicfile.ErrNotRegular) || err.Error() != path+c.want {
				t.Fatalf("got %v, want %q", err, path+c.want)
			}
			after, _ := os.Lstat(path)
			if after.Mode() != before.Mode() {
				t.Errorf("%s is now %v, was %v", path, after.Mode(), before.Mode())
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 1 {
				t.Errorf("left behind: %v", ents)
			}
		})
	}
	if got, _ := os.ReadFile(elsewhere); string(got) != "keep me" {
		t.Errorf("the symlink's target now holds %q", got)
	}
}

// Errors name the user's path, not the hidden temporary.
func TestExportErrorNamesPath(t *testing.T) {
	dev, err := New(64<<10, 4096, nil)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "nonexist", "x.disk")
	_, err = Export(context.Background(), dev, path, ExportOptions{})
	if want := "cannot write " + path + ": no such directory"; err == nil || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}
	if !errors.Is(err, fs.ErrNotExist) || strings.Contains(err.Error(), atomicfile.TempMarker) {
		t.Errorf("%v", err)
	}
}

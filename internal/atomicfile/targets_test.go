package atomicfile

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// writers are the ways of writing a file through this package; each must
// refuse the same targets.
var writers = map[string]func(path string) error{
	"WriteFile": func(path string) error { return WriteFile(path, []byte("new"), 0o644) },
	"Create+Commit": func(path string) error {
		f, err := Create(path)
		if err != nil {
			return err
		}
		defer f.Abort()
		if _, err := f.Write([]byte("new")); err != nil {
			return err
		}
		return f.Commit()
	},
	"CreateIn+CommitAs": func(path string) error {
		f, err := CreateIn(filepath.Dir(path), "blob")
		if err != nil {
			return err
		}
		defer f.Abort()
		if _, err := f.Write([]byte("new")); err != nil {
			return err
		}
		return f.CommitAs(path)
	},
	"CommitName": func(path string) error {
		f, err := CreateIn(filepath.Dir(path), "blob")
		if err != nil {
			return err
		}
		defer f.Abort()
		f.Close()
		return CommitName(f.Name(), path)
	},
}

// checkRefused runs every writer on path (made by mk in a fresh directory)
// and wants an ErrNotRegular naming path and what it is, with path still
// what mk made (same mode, same link target) and no temporary left behind.
func checkRefused(t *testing.T, mk func(path string), want string) {
	t.Helper()
	for name, write := range writers {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "out")
			mk(path)
			before, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			link, _ := os.Readlink(path)
			err = write(path)
			if !errors.Is(err, ErrNotRegular) {
				t.Fatalf("got %v, want ErrNotRegular", err)
			}
			if msg := err.Error(); !strings.HasPrefix(msg, path) || !strings.Contains(msg, want) || strings.Contains(msg, TempMarker) || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line starting with %s and saying %q, no temporary's name", msg, path, want)
			}
			after, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			if after.Mode() != before.Mode() || after.Sys().(*syscall.Stat_t).Rdev != before.Sys().(*syscall.Stat_t).Rdev {
				t.Errorf("%s changed: %v, was %v", path, after.Mode(), before.Mode())
			}
			if l, _ := os.Readlink(path); l != link {
				t.Errorf("symlink now points to %q, was %q", l, link)
			}
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if IsTemp(e.Name()) {
					t.Errorf("temporary left: %s", e.Name())
				}
			}
		})
	}
}

func TestRefusesCharDevice(t *testing.T) {
	testutil.RequireRoot(t)
	checkRefused(t, func(path string) {
		// The numbers of /dev/null: renaming over the node would have made
		// it a plain file.
		if err := unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
			t.Fatal(err)
		}
	}, "not a regular file (a character device); refusing to replace it")
}

func TestRefusesBlockDevice(t *testing.T) {
	testutil.RequireRoot(t)
	checkRefused(t, func(path string) {
		if err := unix.Mknod(path, unix.S_IFBLK|0o660, int(unix.Mkdev(7, 0))); err != nil {
			t.Fatal(err)
		}
	}, "(a block device)")
}

func TestRefusesFIFO(t *testing.T) {
	checkRefused(t, func(path string) {
		if err := unix.Mkfifo(path, 0o644); err != nil {
			t.Fatal(err)
		}
	}, "(a named pipe)")
}

func TestRefusesSymlink(t *testing.T) {
	target := filepath.Join(t.TempDir(), "elsewhere")
	if err := os.WriteFile(target, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	checkRefused(t, func(path string) {
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
	}, "(a symbolic link to "+target+")")
	if got, _ := os.ReadFile(target); string(got) != "keep me" {
		t.Errorf("the symlink's target now holds %q", got)
	}
	// A dangling link is refused too: writing would create a file
	// somewhere the user did not name.
	checkRefused(t, func(path string) {
		if err := os.Symlink(filepath.Join(t.TempDir(), "none"), path); err != nil {
			t.Fatal(err)
		}
	}, "a symbolic link")
}

func TestRefusesDirectory(t *testing.T) {
	checkRefused(t, func(path string) {
		if err := os.Mkdir(path, 0o755); err != nil {
			t.Fatal(err)
		}
	}, "is a directory; refusing to replace it")
}

// A target that becomes a symlink while the temporary is written is still
// not renamed over.
func TestCommitChecksAgain(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "out")
	f, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort()
	if err := os.Symlink("/dev/null", path); err != nil {
		t.Fatal(err)
	}
	if err := f.Commit(); !errors.Is(err, ErrNotRegular) {
		t.Fatalf("commit over a new symlink: %v", err)
	}
	if st, _ := os.Lstat(path); st.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("the symlink was replaced: %v", st.Mode())
	}
}

// Errors name the user's path and the reason, never the temporary.
func TestErrorsNameThePath(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "nonexist", "x.disk")
	err := WriteFile(missing, nil, 0o644)
	if want := "cannot write " + missing + ": no such directory"; err == nil || err.Error() != want {
		t.Errorf("got %v, want %q", err, want)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%v is not ErrNotExist", err)
	}
	if _, err := CreateIn(filepath.Join(dir, "nonexist"), "blob"); err == nil || strings.Contains(err.Error(), TempMarker) {
		t.Errorf("CreateIn in a missing directory: %v", err)
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	err = WriteFile(filepath.Join(file, "x"), nil, 0o644)
	if err == nil || !strings.HasPrefix(err.Error(), "cannot write "+filepath.Join(file, "x")+": ") || strings.Contains(err.Error(), TempMarker) {
		t.Errorf("write under a file: %v", err)
	}
	f, err := Create(filepath.Join(dir, "y"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort()
	if err := f.Truncate(-1); err == nil || err.Error() != "cannot write "+filepath.Join(dir, "y")+": invalid argument" {
		t.Errorf("failed truncate: %v", err)
	}
}

func TestCreateInAndIsTemp(t *testing.T) {
	dir := t.TempDir()
	f, err := CreateIn(dir, "blob")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort()
	if !IsTemp(filepath.Base(f.Name())) {
		t.Errorf("IsTemp(%q) = false", filepath.Base(f.Name()))
	}
	g, err := Create(filepath.Join(dir, "x.disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Abort()
	if !IsTemp(filepath.Base(g.Name())) {
		t.Errorf("IsTemp(%q) = false", filepath.Base(g.Name()))
	}
	for _, name := range []string{"x.disk", "0123abcd.data", "a.tmp-b", ".lock"} {
		if IsTemp(name) {
			t.Errorf("IsTemp(%q) = true", name)
		}
	}
	f.Write([]byte("blob"))
	if err := f.CommitAs(filepath.Join(dir, "id")); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "id")); string(got) != "blob" {
		t.Errorf("committed %q", got)
	}
	if _, err := os.Stat(f.Name()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("temporary still there: %v", err)
	}
}

// io.Copy into a File reports a failed write about the target too.
func TestCopyErrorNamesPath(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	// A 1 MiB tmpfs fills up: ENOSPC.
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		testutil.Unavailable(t, "mount tmpfs: %v", err)
	}
	defer unix.Unmount(dir, 0)
	path := filepath.Join(dir, "big")
	f, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Abort()
	_, err = io.Copy(f, io.LimitReader(zeros{}, 4<<20))
	if want := "cannot write " + path + ": no space left on device"; err == nil || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// Package atomicfile replaces files so that a crash leaves either the old
// content or the new, whole: write a temporary file beside the target, sync
// it, rename it over the target, sync the directory.
//
// Every output of rafsnbd goes through here, for three things done once:
// temporaries all carry TempMarker (so IsTemp finds the leftovers of any
// interrupted write), an existing target that is not a regular file (a
// device node, a symbolic link, a directory) is refused rather than renamed
// over, and errors name the user's path, never the hidden temporary.
package atomicfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// TempMarker is in the name of every temporary file this package makes
// ("." + name + TempMarker + random), so that leftovers of interrupted
// writes can be recognised and removed (see IsTemp).
const TempMarker = ".tmp-"

// IsTemp reports whether the base name name is a temporary of this
// package: a leftover of an interrupted write once no writer is running.
func IsTemp(name string) bool {
	return strings.HasPrefix(name, ".") && strings.Contains(name, TempMarker)
}

// ErrNotRegular is wrapped by the error for a target that exists and is
// not a regular file.
var ErrNotRegular = errors.New("not a regular file")

// CheckTarget returns nil when path does not exist or is a regular file,
// the only things a rename may replace. A device node renamed over would
// turn /dev/null into a file; a symbolic link would be replaced rather than
// written through; a directory would fail late with a temporary's name.
func CheckTarget(path string) error {
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return WriteError(path, err)
	case st.Mode().IsRegular():
		return nil
	case st.IsDir():
		return notRegular(path + " is a directory; refusing to replace it")
	}
	return notRegular(fmt.Sprintf("%s: not a regular file (%s); refusing to replace it", path, kind(path, st.Mode())))
}

// notRegular is the message of a refused target; it is ErrNotRegular.
type notRegular string

func (e notRegular) Error() string        { return string(e) }
func (e notRegular) Is(target error) bool { return target == ErrNotRegular }

// kind names what a non-regular, non-directory file is.
func kind(path string, m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		if to, err := os.Readlink(path); err == nil {
			return "a symbolic link to " + to
		}
		return "a symbolic link"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	}
	return "mode " + m.String()
}

// Error is a failed write of Path. It keeps the system error for errors.Is
// but prints only its reason: the file it happened on is a temporary the
// user never named.
type Error struct {
	Path string
	Err  error
}

func (e *Error) Error() string {
	reason := e.Err.Error()
	var errno syscall.Errno
	switch {
	case errors.Is(e.Err, fs.ErrNotExist):
		// The temporary is created fresh, so what is missing is a directory.
		reason = "no such directory"
	case errors.Is(e.Err, syscall.ENOTDIR):
		reason = "a component of its directory is not a directory"
	case errors.As(e.Err, &errno):
		reason = errno.Error()
	}
	return "cannot write " + e.Path + ": " + reason
}

func (e *Error) Unwrap() error { return e.Err }

// WriteError makes err (from an operation on path's temporary) an *Error
// about path; nil stays nil and an *Error is kept. For callers that handle
// a temporary by name (a hard link, a chmod).
func WriteError(path string, err error) error {
	var ae *Error
	if err == nil || errors.As(err, &ae) {
		return err
	}
	return &Error{Path: path, Err: err}
}

// File is a temporary being written in place of Path (or, from CreateIn,
// of a name given at CommitAs). Its write methods report errors about the
// final path.
type File struct {
	*os.File
	path      string // the target, "" until CommitAs for CreateIn
	dir       string
	committed bool
	closed    bool
}

// Create checks that path may be replaced and creates a temporary for it
// in its directory, named after it.
func Create(path string) (*File, error) {
	if err := CheckTarget(path); err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+TempMarker+"*")
	if err != nil {
		return nil, WriteError(path, err)
	}
	return &File{File: f, path: path, dir: dir}, nil
}

// CreateIn creates a temporary in dir for a file whose name is known only
// once it is written (a blob named by its hash); what goes into the
// temporary's name. Commit it with CommitAs.
func CreateIn(dir, what string) (*File, error) {
	f, err := os.CreateTemp(dir, "."+what+TempMarker+"*")
	if err != nil {
		return nil, WriteError(dir, err)
	}
	return &File{File: f, dir: dir}, nil
}

// target is what errors name: the final path, or the directory written
// into while it is unknown.
func (f *File) target() string {
	if f.path != "" {
		return f.path
	}
	return f.dir
}

func (f *File) Write(p []byte) (int, error) {
	n, err := f.File.Write(p)
	return n, WriteError(f.target(), err)
}

func (f *File) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.File.WriteAt(p, off)
	return n, WriteError(f.target(), err)
}

// ReadFrom hides *os.File's, whose write errors would name the temporary
// (io.Copy into a File uses it); read errors stay the reader's own.
func (f *File) ReadFrom(r io.Reader) (int64, error) { return io.Copy(writerOnly{f}, r) }

type writerOnly struct{ io.Writer }

func (f *File) Truncate(size int64) error { return WriteError(f.target(), f.File.Truncate(size)) }
func (f *File) Chmod(mode os.FileMode) error {
	return WriteError(f.target(), f.File.Chmod(mode))
}
func (f *File) Sync() error { return WriteError(f.target(), f.File.Sync()) }

// Close closes the temporary; it stays in place until Commit or Abort.
func (f *File) Close() error {
	if f.closed {
		return nil
	}
	f.closed = true
	return WriteError(f.target(), f.File.Close())
}

// Commit syncs and closes the temporary, renames it to the path given to
// Create and syncs the directory. After an error the temporary is left for
// Abort.
func (f *File) Commit() error { return f.commit(f.path, true) }

// CommitAs is Commit to path, which must be in the directory given to
// CreateIn.
func (f *File) CommitAs(path string) error { return f.commit(path, true) }

// CommitUnsynced is Commit without syncing the file or the directory: other
// processes never see a partial file, but a crash may lose it (or, rarely,
// leave it short).
func (f *File) CommitUnsynced() error { return f.commit(f.path, false) }

func (f *File) commit(path string, sync bool) error {
	f.path = path
	if sync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := publish(f.Name(), path); err != nil {
		return err
	}
	f.committed = true
	if sync {
		return WriteError(path, SyncDir(filepath.Dir(path)))
	}
	return nil
}

// Abort closes and removes the temporary unless it was committed; defer it
// right after Create.
func (f *File) Abort() {
	f.Close()
	if !f.committed {
		os.Remove(f.Name())
	}
}

// publish renames tmp to path, checking path again: it may have become a
// symbolic link or a device during a long write. (A swap in the instant
// between the check and the rename is not guarded against.)
func publish(tmp, path string) error {
	if err := CheckTarget(path); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return WriteError(path, err)
	}
	return nil
}

// CommitName is Commit for a temporary known by name only (made by
// CreateIn and closed, or a hard link to someone else's file): it syncs
// the file, renames it to path and syncs the directory.
func CommitName(tmp, path string) error {
	f, err := os.Open(tmp)
	if err != nil {
		return WriteError(path, err)
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		return WriteError(path, err)
	}
	if err := publish(tmp, path); err != nil {
		return err
	}
	return WriteError(path, SyncDir(filepath.Dir(path)))
}

// WriteFile replaces path with data, with mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	f, err := Create(path)
	if err != nil {
		return err
	}
	defer f.Abort()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	return f.Commit()
}

// SyncDir makes renames and removals in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

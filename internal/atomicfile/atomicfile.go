// Package atomicfile replaces files so that a crash leaves either the old
// content or the new, whole: write a temporary file beside the target, sync
// it, rename it over the target, sync the directory.
package atomicfile

import (
	"os"
	"path/filepath"
)

// TempMarker is in the name of every temporary file CreateTemp makes
// ("." + base + TempMarker + random), so that leftovers of interrupted
// writes can be recognised and removed.
const TempMarker = ".tmp-"

// CreateTemp creates a temporary file in the directory of path, named after
// it, for a caller that streams its content before Commit.
func CreateTemp(path string) (*os.File, error) {
	return os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+TempMarker+"*")
}

// WriteFile replaces path with data, with mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := CreateTemp(path)
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	err = tmp.Chmod(perm)
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err != nil {
		tmp.Close()
		return err
	}
	return Commit(tmp, path)
}

// Commit syncs and closes tmp (from CreateTemp), renames it to path and
// syncs the directory. tmp is closed whatever happens; on error the caller
// removes it.
func Commit(tmp *os.File, path string) error {
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
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

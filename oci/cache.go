package oci

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// Directory and file modes of the cache: the cache holds other people's
// images, so it is not world-readable.
const (
	cacheDirMode  = 0o750
	cacheFileMode = 0o640
)

// cache is an open cache directory.
type cache struct {
	dir string
}

func openCache(dir string) (*cache, error) {
	if dir == "" {
		return nil, errors.New("oci: no cache directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("oci: cache %s: %w", dir, err)
	}
	c := &cache{dir: abs}
	for _, d := range []string{"", "blobs", "layers", "images", "locks", "staging"} {
		if err := os.MkdirAll(filepath.Join(abs, d), cacheDirMode); err != nil {
			return nil, fmt.Errorf("oci: cache: %w", err)
		}
	}
	return c, nil
}

func (c *cache) blobDir() string              { return filepath.Join(c.dir, "blobs") }
func (c *cache) blobPath(hex string) string   { return filepath.Join(c.dir, "blobs", hex) }
func (c *cache) layerBoot(hex string) string  { return filepath.Join(c.dir, "layers", hex+".boot") }
func (c *cache) imageDir(hex string) string   { return filepath.Join(c.dir, "images", hex) }
func (c *cache) stagingDir(hex string) string { return filepath.Join(c.dir, "staging", hex) }
func (c *cache) lockPath(kind, key string) string {
	return filepath.Join(c.dir, "locks", kind+"-"+key+".lock")
}

// rel makes a cache path relative for image.json.
func (c *cache) rel(p string) string {
	r, err := filepath.Rel(c.dir, p)
	if err != nil {
		return p
	}
	return r
}

// lockPoll is how often a waiting lock retries; flock(2) itself cannot be
// interrupted by a context.
const lockPoll = 50 * time.Millisecond

// lock takes an exclusive flock on a lock file of the cache, waiting while
// another process (or goroutine) holds it. waiting is called once if the
// lock is busy. The lock goes with the process, so kill -9 releases it.
func (c *cache) lock(ctx context.Context, kind, key string, waiting func()) (unlock func(), err error) {
	p := c.lockPath(kind, key)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, cacheFileMode)
	if err != nil {
		return nil, fmt.Errorf("oci: lock: %w", err)
	}
	told := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("oci: lock %s: %w", p, err)
		}
		if !told && waiting != nil {
			waiting()
			told = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(lockPoll):
		}
	}
}

// freeBytes is the space an unprivileged writer can still use in dir.
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// needSpace fails unless dir has want bytes plus the reserve free. Its
// errors are for the caller to prefix.
func needSpace(dir string, want, reserve int64, what string) error {
	free, err := freeBytes(dir)
	if err != nil {
		return err
	}
	if free < want+reserve {
		return fmt.Errorf("%s needs %s but %s has %s free (keeping %s in reserve)",
			what, byteSize(want), dir, byteSize(free), byteSize(reserve))
	}
	return nil
}

// spaceWatcher wraps a writer of a long stream and fails it when the
// filesystem's free space falls under the reserve, checked every interval
// bytes: the size of a decompressed layer is not known in advance.
type spaceWatcher struct {
	f        *os.File
	dir      string
	reserve  int64
	interval int64
	since    int64
}

func (w *spaceWatcher) Write(p []byte) (int, error) {
	w.since += int64(len(p))
	if w.since >= w.interval {
		w.since = 0
		free, err := freeBytes(w.dir)
		if err != nil {
			return 0, err
		}
		if free < w.reserve+int64(len(p)) {
			return 0, fmt.Errorf("%s has only %s free (keeping %s in reserve)", w.dir, byteSize(free), byteSize(w.reserve))
		}
	}
	return w.f.Write(p)
}

// removeTemps deletes leftovers of interrupted writes: names in dir that
// start with prefix and are atomicfile temporaries. Only call it under the
// lock of the object the temporaries belong to.
func removeTemps(dir, prefix string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) && atomicfile.IsTemp(e.Name()) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

func byteSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

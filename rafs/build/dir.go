package build

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// FromDir builds an image of the tree under srcDir: one blob of compressed,
// deduplicated chunks in opts.BlobDir (none when no file has data) and the
// bootstrap, written to bootstrap. Symlinks are stored, never followed;
// hard links inside srcDir stay hard links. opts.BlobDir and opts.Exclude
// are left out of the image where they lie inside srcDir.
func FromDir(ctx context.Context, srcDir string, bootstrap io.Writer, opts Options) (*Result, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	w := &dirWalker{ctx: ctx, links: make(map[devIno]*inode)}
	// The source itself may be named through a symlink; nothing below it
	// is followed.
	srcDir, err := filepath.EvalSymlinks(srcDir)
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	if w.exclude, err = excludeSet(append([]string{opts.BlobDir}, opts.Exclude...)); err != nil {
		return nil, err
	}
	root, err := w.stat(srcDir)
	if err != nil {
		return nil, err
	}
	if root == nil {
		return nil, fmt.Errorf("build: the source %s is one of the build's outputs", srcDir)
	}
	if !root.isDir() {
		return nil, fmt.Errorf("build: %s is not a directory", srcDir)
	}
	if err := w.walk(srcDir, root); err != nil {
		return nil, err
	}

	info, blob, pending, err := writeDirBlob(ctx, w.files, &opts)
	if err != nil {
		return nil, err
	}
	// As in FromTar, the blob takes its name only once the bootstrap is
	// written.
	committed := false
	defer func() {
		if pending != nil && !committed {
			os.Remove(pending.tmp)
		}
	}()
	tree, err := toNodes(root, nil)
	if err != nil {
		return nil, err
	}
	res := &Result{}
	var blobs []rafs.BlobInfo
	if info != nil {
		blobs = append(blobs, *info)
		res.Blobs = append(res.Blobs, *blob)
	}
	res.Bootstrap, err = rafs.WriteBootstrap(bootstrap, tree, blobs, rafs.WriteOptions{
		ChunkSize:  opts.ChunkSize,
		Compressor: opts.Compressor,
		Digester:   opts.Digester,
	})
	if err != nil {
		return nil, err
	}
	if pending != nil {
		if _, err := pending.commit(); err != nil {
			return nil, err
		}
		committed = true
	}
	return res, nil
}

type devIno struct{ dev, ino uint64 }

type dirWalker struct {
	ctx     context.Context
	links   map[devIno]*inode   // inodes with more than one link, by source identity
	files   []*inode            // regular files with data, in walk order
	exclude map[devIno]struct{} // Options.Exclude and BlobDir
}

// excludeSet finds the identities of the paths to leave out: each path's
// own and, for a symlink, its target's (outputs are written through it).
func excludeSet(paths []string) (map[devIno]struct{}, error) {
	set := make(map[devIno]struct{})
	for _, p := range paths {
		for _, stat := range []func(string, *unix.Stat_t) error{unix.Lstat, unix.Stat} {
			var st unix.Stat_t
			err := stat(p, &st)
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
				continue // not there: nothing to leave out
			}
			if err != nil {
				return nil, fmt.Errorf("build: %s: %w", p, err)
			}
			set[devIno{uint64(st.Dev), st.Ino}] = struct{}{}
		}
	}
	return set, nil
}

// walk adds the entries of directory path to dir, depth first in name order.
func (w *dirWalker) walk(path string, dir *inode) error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	ents, err := os.ReadDir(path) // sorted by name
	if err != nil {
		return fmt.Errorf("build: %w", err)
	}
	for _, e := range ents {
		p := filepath.Join(path, e.Name())
		in, err := w.stat(p)
		if err != nil {
			return err
		}
		if in == nil {
			continue // excluded
		}
		dir.children[e.Name()] = in
		if in.isDir() {
			if err := w.walk(p, in); err != nil {
				return err
			}
		}
	}
	return nil
}

// stat makes the inode for path, or returns the one already made for
// another name of the same file; nil for an excluded path.
func (w *dirWalker) stat(path string) (*inode, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, fmt.Errorf("build: %s: %w", path, err)
	}
	id := devIno{uint64(st.Dev), st.Ino}
	if _, ok := w.exclude[id]; ok {
		return nil, nil
	}
	if st.Mode&rafs.ModeTypeMask != rafs.ModeDir && st.Nlink > 1 {
		if in, ok := w.links[id]; ok {
			return in, nil
		}
	}
	in := &inode{}
	m := &in.meta
	m.Mode = st.Mode
	m.UID, m.GID = st.Uid, st.Gid
	m.Mtime, m.MtimeNsec = st.Mtim.Sec, uint32(st.Mtim.Nsec)
	switch st.Mode & rafs.ModeTypeMask {
	case rafs.ModeDir:
		in.children = make(map[string]*inode)
	case rafs.ModeRegular:
		m.Size = uint64(st.Size)
		in.srcPath = path
		if m.Size > 0 {
			w.files = append(w.files, in)
		}
	case rafs.ModeSymlink:
		target, err := os.Readlink(path)
		if err != nil {
			return nil, fmt.Errorf("build: %w", err)
		}
		m.Target = target
	case rafs.ModeChar, rafs.ModeBlock:
		m.RdevMajor, m.RdevMinor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	case rafs.ModeFifo, rafs.ModeSocket:
	default:
		return nil, fmt.Errorf("build: %s: unsupported file type %#o", path, st.Mode&rafs.ModeTypeMask)
	}
	xattrs, err := readXattrs(path)
	if err != nil {
		return nil, err
	}
	m.Xattrs = xattrs
	if st.Mode&rafs.ModeTypeMask != rafs.ModeDir && st.Nlink > 1 {
		w.links[id] = in
	}
	return in, nil
}

// readXattrs returns the extended attributes of path (not following a
// final symlink), or nil when it has none or the filesystem has none.
func readXattrs(path string) (map[string][]byte, error) {
	var names []string
	buf := make([]byte, 1024)
	for {
		n, err := unix.Llistxattr(path, buf)
		if errors.Is(err, unix.ERANGE) {
			sz, err := unix.Llistxattr(path, nil)
			if err != nil {
				return nil, fmt.Errorf("build: %s: listing xattrs: %w", path, err)
			}
			buf = make([]byte, sz+256)
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("build: %s: listing xattrs: %w", path, err)
		}
		names = splitNul(buf[:n])
		break
	}
	if len(names) == 0 {
		return nil, nil
	}
	slices.Sort(names)
	m := make(map[string][]byte, len(names))
	val := make([]byte, 4096)
	for _, name := range names {
		for {
			n, err := unix.Lgetxattr(path, name, val)
			if errors.Is(err, unix.ERANGE) {
				sz, err := unix.Lgetxattr(path, name, nil)
				if err != nil {
					return nil, fmt.Errorf("build: %s: xattr %s: %w", path, name, err)
				}
				val = make([]byte, sz+256)
				continue
			}
			if errors.Is(err, unix.ENODATA) { // removed meanwhile
				break
			}
			if err != nil {
				return nil, fmt.Errorf("build: %s: xattr %s: %w", path, name, err)
			}
			m[name] = slices.Clone(val[:n])
			break
		}
	}
	return m, nil
}

func splitNul(b []byte) []string {
	var out []string
	for len(b) > 0 {
		i := slices.Index(b, 0)
		if i < 0 {
			i = len(b)
		}
		if i > 0 {
			out = append(out, string(b[:i]))
		}
		b = b[min(i+1, len(b)):]
	}
	return out
}

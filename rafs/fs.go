package rafs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/readat"
)

// FS returns a read-only io/fs view of the image. blobs[i] serves the
// uncompressed address space of blob i (Image.Blobs[i]); an
// UncompressedReader, a tarfs layer file or a blob cache are all fine. A
// nil or missing blob reader makes reads of that blob's files fail; the
// tree itself can be listed without any.
//
// The view implements fs.ReadDirFS, fs.ReadFileFS, fs.StatFS and
// fs.ReadLinkFS. Symlinks are never followed as the last path element:
// Open, Stat and ReadDir report them with fs.ModeSymlink, and reading an
// opened symlink yields its target. Symlinks in intermediate elements are
// resolved inside the image. Directories are listed without "." and "..".
// FileInfo.Sys returns the *Entry. Names that are not valid UTF-8 (legal
// in EROFS) are listed but cannot be opened: io/fs paths are UTF-8.
func (img *Image) FS(blobs []io.ReaderAt) fs.FS {
	return &imageFS{img: img, blobs: blobs}
}

type imageFS struct {
	img   *Image
	blobs []io.ReaderAt
}

var (
	_ fs.ReadDirFS   = (*imageFS)(nil)
	_ fs.ReadFileFS  = (*imageFS)(nil)
	_ fs.StatFS      = (*imageFS)(nil)
	_ fs.ReadLinkFS  = (*imageFS)(nil)
	_ fs.ReadDirFile = (*dirFile)(nil)
	_ io.ReaderAt    = (*dataFile)(nil)
	_ io.Seeker      = (*dataFile)(nil)
)

func (f *imageFS) lookup(op, name string) (*Entry, error) {
	if !fs.ValidPath(name) {
		return nil, &fs.PathError{Op: op, Path: name, Err: fs.ErrInvalid}
	}
	e, err := f.img.Lookup(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			err = fs.ErrNotExist
		}
		return nil, &fs.PathError{Op: op, Path: name, Err: err}
	}
	return e, nil
}

func (f *imageFS) Open(name string) (fs.File, error) {
	e, err := f.lookup("open", name)
	if err != nil {
		return nil, err
	}
	info := &fileInfo{name: path.Base(name), e: e}
	if e.IsDir() {
		return &dirFile{fsys: f, path: name, info: info}, nil
	}
	df := &dataFile{fsys: f, path: name, info: info}
	if e.IsRegular() {
		if df.extents, err = f.img.FileExtents(e); err != nil {
			return nil, &fs.PathError{Op: "open", Path: name, Err: err}
		}
	}
	return df, nil
}

func (f *imageFS) Stat(name string) (fs.FileInfo, error) { return f.stat("stat", name) }

// Lstat is Stat: the last element is never followed.
func (f *imageFS) Lstat(name string) (fs.FileInfo, error) { return f.stat("lstat", name) }

func (f *imageFS) stat(op, name string) (fs.FileInfo, error) {
	e, err := f.lookup(op, name)
	if err != nil {
		return nil, err
	}
	return &fileInfo{name: path.Base(name), e: e}, nil
}

func (f *imageFS) ReadLink(name string) (string, error) {
	e, err := f.lookup("readlink", name)
	if err != nil {
		return "", err
	}
	if !e.IsSymlink() {
		return "", &fs.PathError{Op: "readlink", Path: name, Err: fs.ErrInvalid}
	}
	return e.Target, nil
}

func (f *imageFS) ReadDir(name string) ([]fs.DirEntry, error) {
	e, err := f.lookup("readdir", name)
	if err != nil {
		return nil, err
	}
	ents, err := f.readDir(e)
	if err != nil {
		return nil, &fs.PathError{Op: "readdir", Path: name, Err: err}
	}
	return ents, nil
}

// readDir lists a directory, reading every child inode so that each
// entry's type and info agree with what Stat reports.
func (f *imageFS) readDir(e *Entry) ([]fs.DirEntry, error) {
	if !e.IsDir() {
		return nil, errors.New("not a directory")
	}
	ents, _, err := f.img.readDir(e)
	if err != nil {
		return nil, err
	}
	out := make([]fs.DirEntry, len(ents))
	for i, d := range ents {
		child, err := f.img.Inode(d.Nid)
		if err != nil {
			return nil, err
		}
		if err := checkDirentType(e, d, child); err != nil {
			return nil, err
		}
		out[i] = fs.FileInfoToDirEntry(&fileInfo{name: d.Name, e: child})
	}
	return out, nil
}

// maxPrealloc bounds the buffer ReadFile allocates up front; larger files
// are read incrementally so that a hostile size cannot panic make.
const maxPrealloc = 1 << 30

func (f *imageFS) ReadFile(name string) ([]byte, error) {
	file, err := f.Open(name)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	df, ok := file.(*dataFile)
	if !ok {
		return nil, &fs.PathError{Op: "read", Path: name, Err: errors.New("is a directory")}
	}
	size := df.size()
	if size <= maxPrealloc {
		buf := make([]byte, size)
		if _, err := df.ReadAt(buf, 0); err != nil && err != io.EOF {
			return nil, err
		}
		return buf, nil
	}
	return io.ReadAll(df)
}

// fileInfo implements fs.FileInfo for an Entry.
type fileInfo struct {
	name string
	e    *Entry
}

func (fi *fileInfo) Name() string { return fi.name }
func (fi *fileInfo) Size() int64 {
	if fi.e.Size > 1<<63-1 {
		return 1<<63 - 1
	}
	return int64(fi.e.Size)
}
func (fi *fileInfo) Mode() fs.FileMode  { return fi.e.FileMode() }
func (fi *fileInfo) ModTime() time.Time { return fi.e.ModTime() }
func (fi *fileInfo) IsDir() bool        { return fi.e.IsDir() }
func (fi *fileInfo) Sys() any           { return fi.e }

// dirFile is an open directory.
type dirFile struct {
	fsys    *imageFS
	path    string
	info    *fileInfo
	entries []fs.DirEntry // loaded on the first ReadDir
	loaded  bool
	pos     int
}

func (d *dirFile) Stat() (fs.FileInfo, error) { return d.info, nil }
func (d *dirFile) Close() error               { return nil }
func (d *dirFile) Read([]byte) (int, error) {
	return 0, &fs.PathError{Op: "read", Path: d.path, Err: errors.New("is a directory")}
}

func (d *dirFile) ReadDir(n int) ([]fs.DirEntry, error) {
	if !d.loaded {
		ents, err := d.fsys.readDir(d.info.e)
		if err != nil {
			return nil, &fs.PathError{Op: "readdir", Path: d.path, Err: err}
		}
		d.entries, d.loaded = ents, true
	}
	rest := d.entries[d.pos:]
	if n <= 0 {
		d.pos = len(d.entries)
		return rest, nil
	}
	if len(rest) == 0 {
		return nil, io.EOF
	}
	n = min(n, len(rest))
	d.pos += n
	return rest[:n], nil
}

// dataFile is an open regular file, symlink (reads yield the target) or
// special file (empty).
type dataFile struct {
	fsys    *imageFS
	path    string
	info    *fileInfo
	extents []Extent
	off     int64
}

func (f *dataFile) Stat() (fs.FileInfo, error) { return f.info, nil }
func (f *dataFile) Close() error               { return nil }

func (f *dataFile) size() int64 {
	if f.info.e.IsSymlink() {
		return int64(len(f.info.e.Target))
	}
	if !f.info.e.IsRegular() {
		return 0
	}
	return f.info.Size()
}

func (f *dataFile) Read(p []byte) (int, error) {
	n, err := f.ReadAt(p, f.off)
	f.off += int64(n)
	if err == io.EOF && n > 0 && n == len(p) {
		err = nil
	}
	return n, err
}

func (f *dataFile) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += f.off
	case io.SeekEnd:
		offset += f.size()
	default:
		return 0, &fs.PathError{Op: "seek", Path: f.path, Err: fs.ErrInvalid}
	}
	if offset < 0 {
		return 0, &fs.PathError{Op: "seek", Path: f.path, Err: fs.ErrInvalid}
	}
	f.off = offset
	return offset, nil
}

func (f *dataFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &fs.PathError{Op: "read", Path: f.path, Err: fs.ErrInvalid}
	}
	size := f.size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	if f.info.e.IsSymlink() {
		copy(p[:n], f.info.e.Target[off:])
	} else if err := f.readExtents(p[:n], uint64(off)); err != nil {
		return 0, &fs.PathError{Op: "read", Path: f.path, Err: err}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readExtents fills p with the file bytes at off from the blob readers.
func (f *dataFile) readExtents(p []byte, off uint64) error {
	end := off + uint64(len(p))
	// Extents are one per chunk of equal size, so the first one touched
	// is found by division.
	i := 0
	if cs := f.info.e.ChunkSize; cs > 0 {
		i = int(off / cs)
	}
	for ; i < len(f.extents) && f.extents[i].FileOffset < end; i++ {
		x := &f.extents[i]
		lo := max(off, x.FileOffset)
		hi := min(end, x.FileOffset+x.Length)
		if lo >= hi {
			continue
		}
		dst := p[lo-off : hi-off]
		if x.Blob < 0 {
			clear(dst)
			continue
		}
		if x.Blob >= len(f.fsys.blobs) || f.fsys.blobs[x.Blob] == nil {
			return fmt.Errorf("no reader for blob %d (%s)", x.Blob, f.fsys.img.Blobs[x.Blob].ID())
		}
		bo := x.BlobOffset + (lo - x.FileOffset)
		if _, err := readat.Full(f.fsys.blobs[x.Blob], dst, int64(bo)); err != nil {
			return fmt.Errorf("blob %d at %d: %w", x.Blob, bo, err)
		}
	}
	return nil
}

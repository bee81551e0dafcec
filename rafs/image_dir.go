package rafs

import (
	"bytes"
	"fmt"
	"io/fs"
	"sort"
	"strings"
)

// DirEntry is one directory entry: a name, the nid it points to and the
// file type recorded in the directory (FileType*).
type DirEntry struct {
	Name string
	Nid  uint64
	Type uint8
}

// ReadDir returns the entries of the directory nid in on-disk order, which
// is bytewise name order, without "." and "..". Every block of the
// directory is read and validated: dirent and name bounds, name syntax,
// global sort order, and the "." and ".." entries.
func (img *Image) ReadDir(nid uint64) ([]DirEntry, error) {
	e, err := img.Inode(nid)
	if err != nil {
		return nil, err
	}
	ents, _, err := img.readDir(e)
	return ents, err
}

// rawDirent is a DirEntry during parsing, with where it was found.
type rawDirent struct {
	DirEntry
	off uint64 // bootstrap offset of the dirent, for errors
}

// dirBlock reads block k of a directory's data (the last one may be
// short) and returns it with its bootstrap offset.
func (img *Image) dirBlock(e *Entry, k uint64) ([]byte, uint64, error) {
	s := fmt.Sprintf("inode %d", e.Nid)
	off := img.metaBase + e.Nid*InodeSlotSize
	blocks, tail, err := img.flatRanges(e, off, s)
	if err != nil {
		return nil, 0, err
	}
	bs := uint64(img.BlockSize)
	start := k * bs
	if start < blocks[1] {
		n := min(bs, blocks[1]-start)
		b, err := img.read(blocks[0]+start, n, s, "directory block")
		return b, blocks[0] + start, err
	}
	b, err := img.read(tail[0], tail[1], s, "inline directory block")
	return b, tail[0], err
}

// dirBlocks is the number of blocks (the last possibly short) of a
// directory's data.
func (img *Image) dirBlocks(e *Entry) uint64 {
	bs := uint64(img.BlockSize)
	return e.Size/bs + min(e.Size%bs, 1)
}

// parseDirBlock decodes one directory block (§7): dirents, then names.
// It checks name offsets, names and the order inside the block.
func parseDirBlock(blk []byte, base uint64, s string) ([]rawDirent, error) {
	if len(blk) < DirentSize {
		return nil, formatErr(base, s, "dirent", len(blk), "directory block of %d bytes cannot hold a dirent", len(blk))
	}
	first := int(le.Uint16(blk[8:]))
	if first < DirentSize || first%DirentSize != 0 || first > len(blk) {
		return nil, formatErr(base+8, s, "nameoff", first,
			"first name offset must be a non-zero multiple of %d inside the %d-byte block", DirentSize, len(blk))
	}
	n := first / DirentSize
	ents := make([]rawDirent, 0, n)
	var prev []byte
	for i := range n {
		var d Dirent
		d.Decode(blk[i*DirentSize:])
		doff := base + uint64(i*DirentSize)
		nameStart := int(d.NameOff)
		nameEnd := len(blk)
		if i+1 < n {
			nameEnd = int(le.Uint16(blk[(i+1)*DirentSize+8:]))
		}
		if nameStart < first || nameStart >= nameEnd || nameEnd > len(blk) {
			return nil, formatErr(doff+8, s, "nameoff", d.NameOff,
				"name offsets out of order or outside the block (entry %d of %d, next at %d)", i, n, nameEnd)
		}
		name := blk[nameStart:nameEnd]
		if i+1 == n { // the last name ends at the first NUL
			if j := bytes.IndexByte(name, 0); j >= 0 {
				name = name[:j]
			}
		}
		switch {
		case len(name) == 0:
			return nil, formatErr(doff+8, s, "name", "", "empty name")
		case len(name) > MaxNameLen:
			return nil, formatErr(doff+8, s, "name", string(name[:32])+"...", "name longer than %d bytes", MaxNameLen)
		case bytes.IndexByte(name, '/') >= 0 || bytes.IndexByte(name, 0) >= 0:
			return nil, formatErr(doff+8, s, "name", string(name), "name contains '/' or NUL")
		case d.FileType > FileTypeSymlink:
			return nil, formatErr(doff+10, s, "file_type", d.FileType, "unknown file type")
		case prev != nil && bytes.Compare(prev, name) >= 0:
			return nil, formatErr(doff+8, s, "name", string(name), "entries not in strictly increasing byte order (after %q)", prev)
		}
		prev = name
		ents = append(ents, rawDirent{DirEntry{Name: string(name), Nid: d.Nid, Type: d.FileType}, doff})
	}
	return ents, nil
}

// readDir parses every block of a directory, checks the order across
// blocks and the "." and ".." entries, and returns the other entries and
// the ".." nid.
func (img *Image) readDir(e *Entry) (ents []DirEntry, parent uint64, err error) {
	s := fmt.Sprintf("inode %d", e.Nid)
	if !e.IsDir() {
		return nil, 0, fmt.Errorf("rafs: inode %d is not a directory (mode %#o)", e.Nid, e.Mode)
	}
	haveDot, haveDotDot := false, false
	prev := ""
	for k := range img.dirBlocks(e) {
		blk, base, err := img.dirBlock(e, k)
		if err != nil {
			return nil, 0, err
		}
		raw, err := parseDirBlock(blk, base, s)
		if err != nil {
			return nil, 0, err
		}
		if k > 0 && raw[0].Name <= prev {
			return nil, 0, formatErr(raw[0].off+8, s, "name", raw[0].Name,
				"entries not in strictly increasing byte order across blocks (after %q)", prev)
		}
		prev = raw[len(raw)-1].Name
		for _, d := range raw {
			switch d.Name {
			case ".":
				if d.Nid != e.Nid || d.Type != FileTypeDir {
					return nil, 0, formatErr(d.off, s, "nid", d.Nid, "\".\" must be a directory entry pointing to the directory itself")
				}
				haveDot = true
			case "..":
				if d.Type != FileTypeDir {
					return nil, 0, formatErr(d.off+10, s, "file_type", d.Type, "\"..\" must be a directory entry")
				}
				parent, haveDotDot = d.Nid, true
			default:
				ents = append(ents, d.DirEntry)
			}
		}
	}
	if !haveDot || !haveDotDot {
		return nil, 0, formatErr(img.metaBase+e.Nid*InodeSlotSize, s, "i_size", e.Size, "directory lacks \".\" or \"..\"")
	}
	return ents, parent, nil
}

// lookupIn finds name in directory e by binary search over its blocks,
// as the kernel does: names are sorted across the whole directory, so only
// O(log blocks) blocks are read. Blocks read are validated on their own;
// the whole-directory checks are ReadDir's and Walk's.
func (img *Image) lookupIn(e *Entry, name string) (DirEntry, bool, error) {
	s := fmt.Sprintf("inode %d", e.Nid)
	lo, hi := uint64(0), img.dirBlocks(e)
	for lo < hi {
		mid := lo + (hi-lo)/2
		blk, base, err := img.dirBlock(e, mid)
		if err != nil {
			return DirEntry{}, false, err
		}
		raw, err := parseDirBlock(blk, base, s)
		if err != nil {
			return DirEntry{}, false, err
		}
		switch {
		case name < raw[0].Name:
			hi = mid
		case name > raw[len(raw)-1].Name:
			lo = mid + 1
		default:
			i := sort.Search(len(raw), func(i int) bool { return raw[i].Name >= name })
			if i < len(raw) && raw[i].Name == name {
				return raw[i].DirEntry, true, nil
			}
			return DirEntry{}, false, nil
		}
	}
	return DirEntry{}, false, nil
}

// maxSymlinkHops bounds symlink resolution in Lookup, like the kernel's
// MAXSYMLINKS.
const maxSymlinkHops = 40

// Lookup resolves a slash-separated path from the root directory ("/",
// "usr/bin/bash" and "/usr/bin/bash" all work) and returns the entry it
// names. Symlinks in intermediate components are followed inside the image
// (absolute targets start at the image root); a final symlink is not.
// A missing name yields an error wrapping fs.ErrNotExist.
func (img *Image) Lookup(path string) (*Entry, error) {
	root, err := img.Inode(img.RootNid())
	if err != nil {
		return nil, err
	}
	stack := []*Entry{root}
	comps := strings.Split(path, "/")
	hops := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		dir := stack[len(stack)-1]
		if !dir.IsDir() {
			return nil, fmt.Errorf("rafs: lookup %q: not a directory: %w", path, fs.ErrNotExist)
		}
		d, found, err := img.lookupIn(dir, c)
		if err != nil {
			return nil, err
		}
		if !found {
			return nil, fmt.Errorf("rafs: lookup %q: %w", path, fs.ErrNotExist)
		}
		e, err := img.Inode(d.Nid)
		if err != nil {
			return nil, err
		}
		if e.IsSymlink() && len(comps) > 0 {
			if hops++; hops > maxSymlinkHops {
				return nil, fmt.Errorf("rafs: lookup %q: too many levels of symbolic links", path)
			}
			if strings.HasPrefix(e.Target, "/") {
				stack = stack[:1]
			}
			comps = append(strings.Split(e.Target, "/"), comps...)
			continue
		}
		stack = append(stack, e)
	}
	return stack[len(stack)-1], nil
}

// Walk calls fn for every entry reachable from the root, depth first in
// directory order (bytewise by name), parents before children, starting
// with "/" for the root; paths are absolute. A hard-linked file is visited
// once per path. If fn returns fs.SkipDir for a directory its contents are
// skipped; for another entry, the rest of its directory is skipped.
// fs.SkipAll stops the walk without error. Walk validates the tree as it
// goes: every inode, "..", dirent types against modes, and that no
// directory is reached twice (a cycle or a hard-linked directory).
func (img *Image) Walk(fn func(path string, e *Entry) error) error {
	root, err := img.Inode(img.RootNid())
	if err != nil {
		return err
	}
	err = img.walk("/", 0, root, root.Nid, map[uint64]bool{}, fn)
	if err == fs.SkipDir || err == fs.SkipAll {
		return nil
	}
	return err
}

// MaxDepth bounds directory nesting in Walk. A path that deep is already
// far beyond PATH_MAX; the bound keeps a hostile bootstrap from exhausting
// the goroutine stack through Walk's recursion.
const MaxDepth = 4096

func (img *Image) walk(path string, depth int, e *Entry, parent uint64, visited map[uint64]bool, fn func(string, *Entry) error) error {
	if depth > MaxDepth {
		return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "nid", Val: e.Nid,
			Msg: fmt.Sprintf("directories nested deeper than %d levels", MaxDepth)}
	}
	if e.IsDir() {
		if visited[e.Nid] {
			return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "nid", Val: e.Nid,
				Msg: fmt.Sprintf("directory reached again at %q (a cycle or a hard-linked directory)", path)}
		}
		visited[e.Nid] = true
	}
	if err := fn(path, e); err != nil {
		if err == fs.SkipDir && e.IsDir() {
			return nil
		}
		return err
	}
	if !e.IsDir() {
		return nil
	}
	ents, dotdot, err := img.readDir(e)
	if err != nil {
		return err
	}
	if dotdot != parent {
		return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "..", Val: dotdot,
			Msg: fmt.Sprintf("\"..\" of %q must point to its parent %d", path, parent)}
	}
	prefix := path
	if prefix != "/" {
		prefix += "/"
	}
	for _, d := range ents {
		child, err := img.Inode(d.Nid)
		if err != nil {
			return fmt.Errorf("%s%s: %w", prefix, d.Name, err)
		}
		if err := checkDirentType(e, d, child); err != nil {
			return err
		}
		if err := img.walk(prefix+d.Name, depth+1, child, e.Nid, visited, fn); err != nil {
			if err == fs.SkipDir {
				return nil
			}
			return err
		}
	}
	return nil
}

// checkDirentType fails when dir's entry d names a file type other than
// that of the inode it points at (child). Unknown types are allowed.
func checkDirentType(dir *Entry, d DirEntry, child *Entry) error {
	if d.Type != FileTypeUnknown && d.Type != child.FileType() {
		return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", dir.Nid), Field: "file_type", Val: d.Type,
			Msg: fmt.Sprintf("dirent %q has type %d but inode %d has mode %#o", d.Name, d.Type, d.Nid, child.Mode)}
	}
	return nil
}

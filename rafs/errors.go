package rafs

import (
	"fmt"
	"strings"
)

// FormatError reports bytes that break the RAFS v6 format: which structure,
// which field, where, and what value was found. Like debug/elf's
// FormatError it is returned for hostile or corrupt input; the reader never
// panics on such input.
type FormatError struct {
	Off    int64  // byte offset of the field in the bootstrap (or blob), -1 if not known
	Struct string // structure, e.g. "superblock", "inode 133", "blob table entry 0"
	Field  string // field within it, e.g. "magic", "i_size", "nameoff"
	Val    any    // offending value, nil when there is none to show
	Msg    string // what is wrong
}

func (e *FormatError) Error() string {
	var b strings.Builder
	b.WriteString("rafs: ")
	b.WriteString(e.Struct)
	if e.Field != "" {
		b.WriteString(" field ")
		b.WriteString(e.Field)
	}
	if e.Off >= 0 {
		fmt.Fprintf(&b, " at offset %#x", e.Off)
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	if e.Val != nil {
		switch v := e.Val.(type) {
		case uint8, uint16, uint32, uint64, uint:
			fmt.Fprintf(&b, " (value %d = %#x)", v, v)
		case string:
			fmt.Fprintf(&b, " (value %q)", v)
		default:
			fmt.Fprintf(&b, " (value %v)", v)
		}
	}
	return b.String()
}

// formatErr builds a FormatError; off is a uint64 or int64 byte offset.
func formatErr[T int64 | uint64 | int](off T, strct, field string, val any, format string, args ...any) *FormatError {
	o := int64(off)
	if uint64(off) > 1<<62 {
		o = -1
	}
	return &FormatError{Off: o, Struct: strct, Field: field, Val: val, Msg: fmt.Sprintf(format, args...)}
}

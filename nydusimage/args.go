package nydusimage

import (
	"fmt"
	"slices"
	"strings"
)

// Spec is the part of one nydus-image subcommand's flags that rafsnbd
// implements.
type Spec struct {
	Values []string          // long names of flags that take a value
	Bools  []string          // long names of flags that take none
	Short  map[string]string // one-letter aliases: "R" -> "request"
}

// Args is a parsed nydus-image command line (after the subcommand).
type Args struct {
	Values     map[string]string
	Bools      map[string]bool
	Positional []string
}

// UnsupportedError is a nydus-image command line that rafsnbd does not
// implement: a subcommand, flag or value only the real nydus-image
// understands.
type UnsupportedError struct {
	What string // "--type dir"
	Hint string // what is supported instead, if anything
}

func (e *UnsupportedError) Error() string {
	s := e.What + " is not supported by rafsnbd"
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

// Unsupported makes an UnsupportedError.
func Unsupported(what, hint string) error { return &UnsupportedError{What: what, Hint: hint} }

// Parse reads args as clap (nydus-image's parser) does, for the flags of
// spec: "--name value", "--name=value", "-X value", "-Xvalue", flags
// anywhere among the positional arguments, and "--" ending the flags.
// "-X value" may also arrive as one argument, space included, as
// nydus-snapshotter passes "-R blobs". A flag outside spec is an
// UnsupportedError; a repeated flag or one without its value is an error.
func Parse(args []string, spec Spec) (*Args, error) {
	a := &Args{Values: map[string]string{}, Bools: map[string]bool{}}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			a.Positional = append(a.Positional, args[i+1:]...)
			break
		}
		if len(arg) < 2 || arg[0] != '-' {
			a.Positional = append(a.Positional, arg)
			continue
		}
		var name, value string
		hasValue := false
		if long, ok := strings.CutPrefix(arg, "--"); ok {
			name, value, hasValue = strings.Cut(long, "=")
		} else {
			short := arg[1:2]
			long, ok := spec.Short[short]
			if !ok {
				return nil, Unsupported("flag -"+short, "")
			}
			name = long
			if rest := strings.TrimLeft(arg[2:], " ="); rest != "" || len(arg) > 2 {
				value, hasValue = rest, true
			}
		}
		shown := "--" + name
		switch {
		case slices.Contains(spec.Bools, name):
			if hasValue {
				return nil, fmt.Errorf("%s takes no value", shown)
			}
			if a.Bools[name] {
				return nil, fmt.Errorf("%s given twice", shown)
			}
			a.Bools[name] = true
		case slices.Contains(spec.Values, name):
			if !hasValue {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("%s needs a value", shown)
				}
				i++
				value = args[i]
			}
			if _, dup := a.Values[name]; dup {
				return nil, fmt.Errorf("%s given twice", shown)
			}
			a.Values[name] = value
		default:
			return nil, Unsupported("flag "+shown, "")
		}
	}
	return a, nil
}

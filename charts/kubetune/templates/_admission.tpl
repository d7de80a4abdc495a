{{/*
CEL of the admission policy on the operator's writes (admissionpolicy.yaml). Each kind has a
policy of its own, so every expression type-checks against that kind's schema; the rules on
labels and owners are shared. The operator's renderings (kubetune.operator.render) satisfy
every rule; tests/operator/test_least_privilege.py checks both sides on a real API server.
*/}}

{{- define "kubetune.admission.childVariables" -}}
- name: subject
  expression: "request.operation == 'DELETE' ? oldObject : object"
- name: labels
  expression: "has(variables.subject.metadata.labels) ? variables.subject.metadata.labels : {}"
- name: jobName
  expression: "'kubetune.io/job-name' in variables.labels ? variables.labels['kubetune.io/job-name'] : ''"
- name: controllers
  expression: >-
    (has(variables.subject.metadata.ownerReferences) ? variables.subject.metadata.ownerReferences : [])
    .filter(r, has(r.controller) && r.controller)
- name: oldLabels
  expression: >-
    request.operation == 'UPDATE' && has(oldObject.metadata.labels) ? oldObject.metadata.labels : {}
{{- end -}}

{{- define "kubetune.admission.childValidations" -}}
- expression: >-
    variables.jobName != '' &&
    variables.labels[?'app.kubernetes.io/managed-by'].orValue('') == 'kubetune-operator'
  message: >-
    the kubetune operator writes only its own children: labels kubetune.io/job-name and
    app.kubernetes.io/managed-by=kubetune-operator are required
- expression: >-
    size(variables.controllers) == 1 &&
    variables.controllers[0].apiVersion.startsWith('kubetune.io/') &&
    variables.controllers[0].kind == 'FineTuneJob' &&
    variables.controllers[0].name == variables.jobName
  message: >-
    the kubetune operator writes only its own children: the controller ownerReference must be
    the kubetune.io FineTuneJob named by label kubetune.io/job-name
- expression: >-
    request.operation != 'UPDATE' || (
      variables.oldLabels[?'app.kubernetes.io/managed-by'].orValue('') == 'kubetune-operator' &&
      variables.oldLabels[?'kubetune.io/job-name'].orValue('') == variables.jobName)
  message: >-
    the kubetune operator updates only objects that already are its children: the stored object
    must carry app.kubernetes.io/managed-by=kubetune-operator and the same kubetune.io/job-name
    (it does not adopt someone else's object)
{{- end -}}

{{- define "kubetune.admission.jobVariables" -}}
- name: pod
  expression: variables.subject.spec.template.spec
- name: podSecurity
  expression: "has(variables.pod.securityContext) ? variables.pod.securityContext : {}"
- name: containers
  expression: >-
    dyn(variables.pod.containers) + dyn(variables.pod.?initContainers.orValue([])) +
    dyn(variables.pod.?ephemeralContainers.orValue([]))
- name: securityContexts
  expression: "dyn([variables.podSecurity]) + variables.containers.map(c, c.?securityContext.orValue({}))"
- name: annotations
  expression: "variables.subject.spec.template.?metadata.?annotations.orValue({})"
{{- end -}}

{{- define "kubetune.admission.jobValidations" -}}
- expression: >-
    variables.containers.all(c,
      (has(c.securityContext) && has(c.securityContext.runAsNonRoot)
        ? c.securityContext.runAsNonRoot : variables.podSecurity.?runAsNonRoot.orValue(false)) &&
      (has(c.securityContext) && has(c.securityContext.runAsUser)
        ? c.securityContext.runAsUser : variables.podSecurity.?runAsUser.orValue(1)) != 0)
  message: >-
    trainer pods run as non-root: spec.template.spec.securityContext.runAsNonRoot must be true
    (or set on every container) and runAsUser must not be 0
- expression: >-
    variables.containers.all(c, !has(c.securityContext) ||
      !c.securityContext.?privileged.orValue(false))
  message: "no privileged containers: securityContext.privileged must not be true"
- expression: >-
    variables.containers.all(c, has(c.securityContext) &&
      !c.securityContext.?allowPrivilegeEscalation.orValue(true))
  message: "every container sets securityContext.allowPrivilegeEscalation: false"
- expression: >-
    variables.containers.all(c, !has(c.securityContext) ||
      c.securityContext.?capabilities.?add.orValue([]).all(cap, cap == 'NET_BIND_SERVICE'))
  message: "no added capabilities (NET_BIND_SERVICE aside)"
- expression: >-
    !variables.pod.?hostNetwork.orValue(false) && !variables.pod.?hostPID.orValue(false) &&
    !variables.pod.?hostIPC.orValue(false)
  message: "no host namespaces: hostNetwork, hostPID and hostIPC must not be true"
- expression: "variables.pod.?volumes.orValue([]).all(v, !has(v.hostPath))"
  message: "no hostPath volumes"
- expression: >-
    variables.containers.all(c, c.?ports.orValue([]).all(p, p.?hostPort.orValue(0) == 0))
  message: "no hostPort on any container port"
- expression: >-
    variables.pod.?serviceAccountName.orValue('') in ['', 'default'] &&
    !variables.pod.?automountServiceAccountToken.orValue(true)
  message: >-
    trainer pods use the namespace's default ServiceAccount without a token:
    no serviceAccountName, and automountServiceAccountToken: false
- expression: >-
    variables.securityContexts.all(s, s.?seccompProfile.?type.orValue('') != 'Unconfined')
  message: "no Unconfined seccompProfile (pod or container securityContext)"
- expression: >-
    variables.securityContexts.all(s,
      s.?appArmorProfile.?type.orValue('RuntimeDefault') in ['RuntimeDefault', 'Localhost']) &&
    variables.annotations.all(k, !k.startsWith('container.apparmor.security.beta.kubernetes.io/') ||
      variables.annotations[k] == 'runtime/default' || variables.annotations[k].startsWith('localhost/'))
  message: >-
    no Unconfined AppArmor profile: appArmorProfile.type RuntimeDefault or Localhost, and
    container.apparmor.security.beta.kubernetes.io/ annotations runtime/default or localhost/
- expression: >-
    variables.securityContexts.all(s,
      s.?seLinuxOptions.?type.orValue('') in ['', 'container_t', 'container_init_t', 'container_kvm_t'] &&
      s.?seLinuxOptions.?user.orValue('') == '' && s.?seLinuxOptions.?role.orValue('') == '')
  message: >-
    seLinuxOptions: type only container_t, container_init_t or container_kvm_t, and no user or role
- expression: >-
    variables.containers.all(c, c.?securityContext.?procMount.orValue('Default') == 'Default')
  message: "procMount must be Default"
- expression: >-
    variables.securityContexts.all(s, !s.?windowsOptions.?hostProcess.orValue(false))
  message: "no Windows HostProcess containers"
- expression: >-
    variables.podSecurity.?sysctls.orValue([]).all(s, s.name in [
      'kernel.shm_rmid_forced', 'net.ipv4.ip_local_port_range', 'net.ipv4.ip_unprivileged_port_start',
      'net.ipv4.tcp_syncookies', 'net.ipv4.ping_group_range', 'net.ipv4.ip_local_reserved_ports',
      'net.ipv4.tcp_keepalive_time', 'net.ipv4.tcp_fin_timeout', 'net.ipv4.tcp_keepalive_intvl',
      'net.ipv4.tcp_keepalive_probes'])
  message: "only the safe sysctls of Pod Security baseline"
- expression: >-
    variables.pod.?volumes.orValue([]).all(v,
      v.?ephemeral.?volumeClaimTemplate.?spec.?volumeName.orValue('') == '')
  message: >-
    ephemeral volumes claim new storage: volumeClaimTemplate.spec.volumeName (binding an
    existing PersistentVolume) is not allowed
- expression: >-
    variables.pod.?volumes.orValue([]).all(v, !has(v.secret) &&
      v.?projected.?sources.orValue([]).all(s, !has(s.secret) && !has(s.serviceAccountToken)))
  message: >-
    no Secret volumes and no projected secret or serviceAccountToken sources: trainer pods read
    only the Secret keys their FineTuneJob names, through env secretKeyRef
{{- end -}}

{{- define "kubetune.admission.serviceVariables" -}}
{{- end -}}

{{- define "kubetune.admission.serviceValidations" -}}
- expression: >-
    variables.subject.spec.?type.orValue('') == 'ClusterIP' && variables.subject.spec.?clusterIP.orValue('') == 'None'
  message: "Services are headless: type ClusterIP with clusterIP None (no ExternalName, NodePort or LoadBalancer)"
- expression: "size(variables.subject.spec.?externalIPs.orValue([])) == 0"
  message: "Services have no externalIPs"
{{- end -}}
